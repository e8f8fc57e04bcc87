"""Tests of the shared summary statistics."""

import pytest
from scipy import stats

from jaxpoison.summaries import fisher_exact_p


def test_fisher_exact_p_on_the_lady_tasting_tea():
    # Fisher (1935): 3 of 4 cups right each way; tables 4/0, 3/1, 1/3, 0/4 of the
    # margins have probabilities 1, 16, 16, 1 (of 70): the two-sided p is 34/70.
    assert fisher_exact_p(3, 4, 1, 4) == pytest.approx(34 / 70)


@pytest.mark.parametrize("counts", [(8, 24, 0, 24), (8, 24, 13, 24), (0, 5, 0, 7)])
def test_fisher_exact_p_matches_scipy(counts):
    a, n_a, b, n_b = counts
    _, expected = stats.fisher_exact([[a, n_a - a], [b, n_b - b]])
    assert fisher_exact_p(*counts) == pytest.approx(expected, rel=1e-9)
