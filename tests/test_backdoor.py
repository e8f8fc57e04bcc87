"""Backdoor plans (Truong et al. Eq. 8-9, BadNets label flips) and their poisons."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpoison import UserInputError
from jaxpoison.attacks import backdoor as bd
from jaxpoison.attacks import triggers as tr
from jaxpoison.victims import make_train_data
from jaxpoison.victims.train import poisoned_batch

FLOWERS = (710, 980, 734, 675, 904)  # Truong et al.'s Flowers class sizes


def test_expected_counts_flowers_table_closed_form():
    """Truong et al. 2020, Table 1 (Flowers, lambda = 0.1), computed by hand.

    n = floor(0.1 N_t); counts_i = n * N_i / sum_{j != t} N_j; sum N = 4003.
      t=0 (710): n=71, pool 3293: 21.13, 15.83, 14.55, 19.49; rate 71/4003=0.0177
      t=1 (980): n=98, pool 3023: 23.02, 23.80, 21.88, 29.31; rate 98/4003=0.0245
      t=2 (734): n=73, pool 3269: 15.85, 21.88, 15.07, 20.19; rate 73/4003=0.0182
      t=3 (675): n=67, pool 3328: 14.29, 19.73, 14.78, 18.20; rate 67/4003=0.0167
      t=4 (904): n=90, pool 3099: 20.62, 28.46, 21.32, 19.60; rate 90/4003=0.0225
    The paper's table itself could not be retrieved here (no copy of it in the
    reference corpora); these are the closed form, to the table's one decimal.
    """
    table = {
        0: ([0.0, 21.1, 15.8, 14.6, 19.5], 0.0177),
        1: ([23.0, 0.0, 23.8, 21.9, 29.3], 0.0245),
        2: ([15.9, 21.9, 0.0, 15.1, 20.2], 0.0182),
        3: ([14.3, 19.7, 14.8, 0.0, 18.2], 0.0167),
        4: ([20.6, 28.5, 21.3, 19.6, 0.0], 0.0225),
    }
    for t, (counts, rate) in table.items():
        per_class, effective = bd.expected_poison_counts(FLOWERS, t, 0.1)
        np.testing.assert_array_equal(np.round(per_class, 1), counts)
        assert per_class.sum() == pytest.approx(np.floor(0.1 * FLOWERS[t]))
        assert effective == pytest.approx(rate, abs=1e-3)
        assert effective == pytest.approx(np.floor(0.1 * FLOWERS[t]) / 4003)


def test_expected_counts_one_to_one_takes_all_from_the_source():
    per_class, effective = bd.expected_poison_counts(FLOWERS, 2, 0.25, [4])
    np.testing.assert_array_equal(per_class, [0, 0, 0, 0, 183])  # floor(183.5)
    assert effective == pytest.approx(183 / 4003)
    # floor tolerates float error: 0.29 * 100 = 28.999999999999996.
    assert bd.expected_poison_counts([100, 100], 0, 0.29)[0][1] == 29


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(poison_class=0, rate=0.1, source_classes=[0, 1]), "cannot also be"),
        (dict(poison_class=5, rate=0.1), "out of range"),
        (dict(poison_class=0, rate=1.5), "rate"),
        (dict(poison_class=0, rate=0.1, source_classes=[7]), "out of range"),
    ],
)
def test_expected_counts_bad_input(kwargs, message):
    with pytest.raises(UserInputError, match=message):
        bd.expected_poison_counts(FLOWERS, **kwargs)


def _labels():
    return np.repeat(np.arange(5), FLOWERS)


def test_poison_rate_plan_supplants_poison_class_rows_and_keeps_class_sizes():
    labels = _labels()
    plan = bd.poison_rate_plan(labels, 1, 0.1, 3)
    assert len(plan.poison_indices) == 98
    assert np.all(labels[plan.poison_indices] == 1)  # supplanted rows: class 1
    assert len(np.unique(plan.poison_indices)) == 98
    assert np.all(labels[plan.source_rows] != 1)  # triggered images: sources
    assert len(np.unique(plan.source_rows)) == 98
    np.testing.assert_array_equal(plan.poison_labels, 1)
    trained_labels = labels.copy()
    trained_labels[plan.poison_indices] = plan.poison_labels
    np.testing.assert_array_equal(np.bincount(trained_labels), FLOWERS)
    again = bd.poison_rate_plan(labels, 1, 0.1, 3)
    np.testing.assert_array_equal(plan.source_rows, again.source_rows)
    other = bd.poison_rate_plan(labels, 1, 0.1, jax.random.key(3))
    assert not np.array_equal(plan.source_rows, other.source_rows)


def test_poison_rate_plan_draws_in_proportion_to_class_sizes():
    """Mean per-class draws over 400 seeds vs Eq. 9's expectation (hypergeometric
    standard error of a mean over 400 draws is < 0.25 here; allow 4 of them)."""
    labels = _labels()
    expected, _ = bd.expected_poison_counts(FLOWERS, 0, 0.1)
    draws = np.stack(
        [
            np.bincount(
                labels[bd.poison_rate_plan(labels, 0, 0.1, s).source_rows], minlength=5
            )
            for s in range(400)
        ]
    )
    np.testing.assert_allclose(draws.mean(0), expected, atol=1.0)
    one = bd.poison_rate_plan(labels, 0, 0.1, 0, source_classes=[3])
    assert np.all(labels[one.source_rows] == 3) and len(one.source_rows) == 71


def test_label_flip_plan_relabels_source_rows_in_place():
    labels = _labels()
    plan = bd.label_flip_plan(labels, 2, 4, 5, seed=0)
    np.testing.assert_array_equal(plan.source_rows, plan.poison_indices)
    assert np.all(labels[plan.source_rows] == 2) and len(set(plan.source_rows)) == 5
    np.testing.assert_array_equal(plan.poison_labels, 4)
    with pytest.raises(UserInputError, match="has 734"):
        bd.label_flip_plan(labels, 2, 4, 800, seed=0)


def test_stack_plans_pads_with_unused_slots():
    labels = _labels()
    plans = [bd.label_flip_plan(labels, 2, 4, n, seed=n) for n in (0, 1, 3)]
    stacked = bd.stack_plans(plans)
    assert stacked.poison_indices.shape == (3, 3)
    np.testing.assert_array_equal(stacked.poison_indices[0], [-1, -1, -1])
    np.testing.assert_array_equal(stacked.poison_indices[1, 1:], [-1, -1])
    np.testing.assert_array_equal(stacked.poison_indices[2], plans[2].poison_indices)


def test_apply_trigger_to_rows_and_the_trainer_swap_them_in():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2] * 4, np.int32)
    plan = bd.poison_rate_plan(labels, 0, 0.5, 1)  # 2 of class 0's 4 rows
    fn = tr.make_trigger("random_square")
    key = jax.random.key(5)
    poisons = bd.apply_trigger_to_rows(images, plan.source_rows, fn, 0.6, key)
    keys = jax.random.split(key, len(plan.source_rows))
    for i, row in enumerate(plan.source_rows):
        x = images[row].astype(np.float32) / 255.0
        ref = 0.4 * x + 0.6 * np.asarray(tr.random_square(keys[i], jnp.asarray(x)))
        np.testing.assert_allclose(poisons[i], ref, atol=1e-6)
    data = make_train_data(
        images, labels, poisons, plan.poison_indices, plan.poison_labels
    )
    x, y, _, hit, _ = poisoned_batch(data, jnp.arange(12))
    np.testing.assert_array_equal(np.flatnonzero(hit), plan.poison_indices)
    np.testing.assert_allclose(x[plan.poison_indices], poisons, atol=1e-6)
    np.testing.assert_array_equal(y, labels)  # supplanted rows keep class 0


def test_apply_trigger_to_rows_passes_per_row_args():
    images = np.zeros((3, 16, 16, 3), np.uint8)
    boxes = jnp.array([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0, 0, 1, 1.0]])

    def tag(key, x, box):
        return tr.patch_in_box(x, box, 0.5, 1.0)

    out = bd.apply_trigger_to_rows(
        images, jnp.arange(3), tag, 1.0, jax.random.key(0), args=(boxes,)
    )
    np.testing.assert_array_equal(out[0, 2:6, 2:6], 1.0)  # 4-px square, box centre
    np.testing.assert_array_equal(out[1, 10:14, 10:14], 1.0)
    np.testing.assert_array_equal(out[2, 4:12, 4:12], 1.0)
    assert float(out.sum()) == 3 * (16 + 16 + 64)


def test_attack_success_rate_ignores_target_class_images():
    preds = jnp.array([2, 2, 0, 2, 1, 2])
    true = jnp.array([0, 1, 0, 2, 1, 2])  # images 3 and 5 are of the target class
    assert float(bd.attack_success_rate(preds, true, 2)) == pytest.approx(2 / 4)
    assert np.isnan(float(bd.attack_success_rate(preds, jnp.full(6, 2), 2)))
