"""Clean-label road signs: F1, input checks, and the whole run (slow, real data)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpoison import UserInputError
from jaxpoison.experiments import roadsigns_cleanlabel as rc
from tests.conftest import SHARED_DATA, load_config


def test_f1_scores_against_hand_counts():
    labels = jnp.array([0, 0, 0, 1, 1, 2, 2, 2])
    preds = jnp.array([0, 1, 0, 1, 2, 2, 2, 0])
    # class 0: TP 2, FP 1, FN 1 -> 4/6; class 1: TP 1, FP 1, FN 1 -> 2/4;
    # class 2: TP 2, FP 1, FN 1 -> 4/6; class 3 never occurs -> 0.
    np.testing.assert_allclose(
        rc.f1_scores(preds, labels, 4), [4 / 6, 2 / 4, 4 / 6, 0.0], rtol=1e-6
    )


def test_f1_of_a_perfect_classifier_is_one():
    labels = jnp.array([0, 1, 2, 3, 1])
    np.testing.assert_allclose(rc.f1_scores(labels, labels, 4), 1.0)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"base_class": "yield"}, "base_class 'yield' unknown"),
        ({"target_class": "stop"}, "must differ"),
        ({"backbones": ("thawed",)}, "unknown backbone"),
        ({"max_poisons": 0}, "max_poisons"),
    ],
)
def test_bad_settings_stop_with_one_line(override, message):
    config = load_config("roadsigns_cleanlabel.py", "runlocal")
    for key, value in override.items():
        config[key] = value
    with pytest.raises(UserInputError, match=message):
        rc.check_config(config)


def test_missing_data_location_is_one_line():
    config = load_config("roadsigns_cleanlabel.py", "runlocal")
    with pytest.raises(UserInputError, match="manual_dir"):
        rc.load_split(config)


@pytest.mark.slow
@pytest.mark.realdata
def test_runlocal_on_the_real_road_signs(tmp_path):
    manual = SHARED_DATA / "roadsigns"
    if not manual.is_dir():
        pytest.skip(f"no {manual}")
    config = load_config("roadsigns_cleanlabel.py", f"manual_dir={manual},runlocal")
    config.data_dir = str(tmp_path / "tfds")
    summary = rc.run(config, str(tmp_path / "run"))
    rows = [
        json.loads(x)
        for x in (tmp_path / "run" / "results.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 2
    assert [v["n_poisons"] for v in rows[0]["victims"]["frozen"]] == [0, 1, 2]
    assert set(summary["settings"]) == {
        f"{b}/n={n}" for b in ("frozen", "unfrozen") for n in range(3)
    }
    assert (tmp_path / "run" / "poisoned.png").stat().st_size > 0
