"""Clean-label road signs: F1, input checks, summaries, and the whole run.

The `smoke` config runs end to end through the command line on the real road
signs (64 training images, 2 targets = 2 chunks, 1 poison, both backbone
settings on the pretrained CIFAR ResNet-20 backbone), once whole and once killed
after its first target and resumed. The runs share a persistent compilation
cache, so only the first compiles: 96 s of CPU for the module (5.5 min wall on the
2 cores shared with other jobs, load ~10).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpoison import UserInputError
from jaxpoison.experiments import roadsigns_cleanlabel as rc
from jaxpoison.report import write_report
from jaxpoison.summaries import group_summary
from jaxpoison.victims.probabilities import f1_scores
from tests.cli_runs import (
    assert_resumes_identically,
    chunk_committed,
    run_cli,
    tfds_dir,
)
from tests.conftest import load_config


def test_f1_scores_against_hand_counts():
    labels = jnp.array([0, 0, 0, 1, 1, 2, 2, 2])
    preds = jnp.array([0, 1, 0, 1, 2, 2, 2, 0])
    # class 0: TP 2, FP 1, FN 1 -> 4/6; class 1: TP 1, FP 1, FN 1 -> 2/4;
    # class 2: TP 2, FP 1, FN 1 -> 4/6; class 3 never occurs -> 0.
    np.testing.assert_allclose(
        f1_scores(preds, labels, 4), [4 / 6, 2 / 4, 4 / 6, 0.0], rtol=1e-6
    )


def test_f1_of_a_perfect_classifier_is_one():
    labels = jnp.array([0, 1, 2, 3, 1])
    np.testing.assert_allclose(f1_scores(labels, labels, 4), 1.0)


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


def test_targets_and_bases_of_each_image_type():
    config = load_config("roadsigns_cleanlabel.py", "runlocal")
    config.base_types = ("single", "multi")
    config.target_types = ("single", "multi")
    config.targets_per_type = 2
    setup = rc.check_config(config)
    eligible = np.array([1, 4, 6, 7])
    multi_test = np.array([0, 0, 0, 0, 0, 0, 1, 0])  # eligible: 1, 4, 7 single; 6 multi
    multi_train = np.array([0] * 5 + [1] * 3)
    specs = rc.make_specs(
        config, setup, eligible, multi_test, np.arange(8), multi_train
    )
    # 2 single targets (of 1, 4, 7) and the 1 multi one, each with both base types.
    assert len(specs["target_pos"]) == 3 * 2
    assert set(specs["target_pos"][specs["target_type"] == 1]) == {6}
    assert set(specs["target_pos"][specs["target_type"] == 0]) <= {1, 4, 7}
    for bt, rows in zip(specs["base_type"], specs["base_rows"], strict=True):
        assert len(set(rows)) == 2 and np.all(multi_train[rows] == bt)
    with pytest.raises(UserInputError, match="only 1 multi-class stop"):
        rc.make_specs(config, setup, eligible, multi_test, np.arange(6), multi_train)
    with pytest.raises(UserInputError, match="no multi-class held-out"):
        rc.make_specs(
            config, setup, eligible[:2], multi_test, np.arange(8), multi_train
        )


def _victim(n, poisoned, accuracy):
    return {
        "n_poisons": n,
        "prediction": "stop" if poisoned else "trafficlight",
        "poisoned": poisoned,
        "accuracy": accuracy,
        "f1_base": 0.5,
        "f1_target": 0.25,
        "target_prob_base": 0.9 if poisoned else 0.1,
        "target_prob_target": 0.1 if poisoned else 0.9,
    }


def test_summary_per_backbone_and_count_against_hand_counts():
    rows = [
        {"victims": {"frozen": [_victim(0, False, 0.7), _victim(1, True, 0.6)]}},
        {"victims": {"frozen": [_victim(0, False, 0.5), _victim(1, False, 0.8)]}},
    ]
    summary = group_summary(rc.victim_records(rows), rc.SETTING, "poisoned", rc.MEANS)
    cell = "base_type=single,target_type=single,backbone=frozen"
    assert list(summary) == [f"{cell},n_poisons=0", f"{cell},n_poisons=1"]
    one = summary[f"{cell},n_poisons=1"]
    assert (one["successes"], one["n"]) == (1, 2)
    assert one["mean_accuracy"] == pytest.approx(0.7)
    assert one["mean_target_prob_base"] == pytest.approx(0.5)
    assert summary[f"{cell},n_poisons=0"]["rate"] == 0.0
    # A target its victim without poisons already calls stop is not flipped.
    already = [{"victims": {"frozen": [_victim(0, True, 0.5), _victim(1, True, 0.5)]}}]
    assert [r["flipped"] for r in rc.victim_records(already)] == [False, False]
    setup = rc.check_config(load_config("roadsigns_cleanlabel.py", "runlocal"))
    verdict = rc.verdict(rc.victim_records(rows), setup, 1)
    assert verdict == {
        "frozen": {
            "poisoned_with_poisons": 1,
            "flipped_with_poisons": 1,
            "victims_with_poisons": 2,
            "accuracy_range": [0.5, 0.8],
            "target_prob_base_n0": pytest.approx(0.1),
            "target_prob_base_n1": pytest.approx(0.5),
        }
    }


# ----------------------------------------------------------------------------
# The command line on the real road signs: smoke size, whole and killed + resumed.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_run(shared_data, tmp_path_factory):
    """One uninterrupted smoke run (later CLI runs load its compiled programs from
    the session's compilation cache: tests/conftest.py)."""
    root = tmp_path_factory.mktemp("cleanlabel_smoke")
    manual = shared_data / "roadsigns"
    args = [
        "--config",
        f"configs/roadsigns_cleanlabel.py:manual_dir={manual},smoke",
        "--data_dir",
        tfds_dir(),
    ]
    run_cli(args, root / "whole")
    yield args, root / "whole"


@pytest.mark.experiment
@pytest.mark.realdata
def test_smoke_run_writes_the_workdir_contract(smoke_run):
    _, workdir = smoke_run
    rows = [json.loads(line) for line in open(workdir / "results.jsonl")]
    assert len(rows) == 2 and [r["seed"] for r in rows] == [0, 1]
    for r in rows:
        assert len(r["base_files"]) == 1 and len(r["feature_distance"]) == 1
        for backbone in ("frozen", "unfrozen"):
            assert [v["n_poisons"] for v in r["victims"][backbone]] == [0, 1]
    assert json.loads((workdir / "sweep.json").read_text())["chunks"] == 2
    summary = json.loads((workdir / "summary.json").read_text())
    assert set(summary["settings"]) == {
        f"backbone={b},n_poisons={n}" for b in ("frozen", "unfrozen") for n in (0, 1)
    }
    for name in ("config.json", "versions.json", "clean_model.msgpack", "poisoned.png"):
        assert (workdir / name).stat().st_size > 0
    assert "Results" in open(write_report(str(workdir))).read()


@pytest.mark.slow  # ~40 s; the default run keeps test_resume.py, the CLI's kills
@pytest.mark.realdata
def test_smoke_run_killed_after_its_first_target_resumes_identically(
    smoke_run, tmp_path: Path
):
    args, whole = smoke_run
    assert_resumes_identically(args, tmp_path, whole, killed_when=chunk_committed(0))
