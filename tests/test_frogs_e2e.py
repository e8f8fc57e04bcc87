"""Poison Frogs end to end: victim plan, nested poisons, and the CLI run
end to end (smoke size, shipped sample, one device per core) and resumed after a
SIGKILL."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpoison import UserInputError
from jaxpoison.experiments import frogs_e2e as fe
from jaxpoison.report import write_report
from jaxpoison.results import read_jsonl
from tests.cli_runs import assert_resumes_identically, chunk_committed, run_cli
from tests.conftest import load_config

SMOKE = ["--config", "configs/frogs_e2e.py:smoke"]


def test_victim_plan_orders_control_counts_and_ablations():
    plan = fe.victim_plan((0.2, 0.3), (1, 10), 0.3, 10)
    assert plan.labels == (
        "control",
        "opacity=0.2/n=1",
        "opacity=0.2/n=10",
        "opacity=0.3/n=1",
        "opacity=0.3/n=10",
        "no_optimisation/n=10",
        "no_watermark/n=10",
        "single_base/n=10",
    )
    # Crafted sets: 0 = opacity 0.2, 1 = 0.3, 2 = no optimisation, 3 = no watermark;
    # the single-base victim repeats a poison of the ablation opacity's set.
    assert plan.source == (-1, 0, 0, 1, 1, 2, 3, 1)
    assert plan.count == (0, 1, 10, 1, 10, 10, 10, 10)
    assert plan.single == (False,) * 7 + (True,)


def test_victim_poisons_nest_counts_and_repeat_the_single_base():
    plan = fe.victim_plan((0.3,), (1, 3), 0.3, 2)
    sets = jnp.arange(3 * 4, dtype=jnp.float32).reshape(3, 4, 1, 1, 1)
    rows = jnp.array([40, 41, 42, 43])
    images, indices = fe.victim_poisons(sets, plan, rows)
    expected = [
        [-1, -1, -1, -1],  # control: every base row enters clean
        [40, -1, -1, -1],
        [40, 41, 42, -1],
        [40, 41, -1, -1],  # no optimisation
        [40, 41, -1, -1],  # no watermark
        [40, 41, -1, -1],  # single base
    ]
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_array_equal(images[2, :, 0, 0, 0], sets[0, :, 0, 0, 0])
    np.testing.assert_array_equal(images[3, :, 0, 0, 0], sets[1, :, 0, 0, 0])
    np.testing.assert_array_equal(images[4, :, 0, 0, 0], sets[2, :, 0, 0, 0])
    np.testing.assert_array_equal(images[5, :, 0, 0, 0], [0.0] * 4)


def test_scaled_learning_rate_matches_paper_steps():
    config = load_config("frogs_e2e.py")
    # 50 per class x 10 + 70 bases = 570 images: 5 steps per epoch, paper 391.
    assert config.victim.learning_rate == pytest.approx(1.85e-5 * 391 / 5)
    assert load_config("frogs_e2e.py", "paper_lr").victim.learning_rate == 1.85e-5


@pytest.mark.parametrize(
    "override, message",
    [
        ({"ablation_opacity": 0.5}, "ablation_opacity"),
        ({"ablation_count": 500}, "ablation_count"),
        ({"pairs": {"x": (2, 2)}}, "pair x"),
        ({"pairs": {"x": (2, 12)}}, "out of range"),
    ],
)
def test_bad_settings_stop_with_one_line(override, message):
    config = load_config("frogs_e2e.py", "runlocal")
    for key, value in override.items():
        config[key] = value
    with pytest.raises(UserInputError, match=message):
        fe.check_config(config)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One uninterrupted smoke run through the CLI (shared by the tests below)."""
    workdir = tmp_path_factory.mktemp("frogs_e2e") / "whole"
    run_cli(SMOKE, workdir)
    return workdir


def test_smoke_run_writes_rows_summary_and_figures(smoke_run):
    rows = read_jsonl(str(smoke_run / "results.jsonl"))
    assert len(rows) == 3 and all(len(r["victims"]) == 6 for r in rows)
    assert {v["n_poisons"] for v in rows[0]["victims"]} == {0, 1, 5}
    assert [r["seed"] for r in rows] == [0, 1, 2]
    for r in rows:
        for v in r["victims"]:
            assert v["success"] == (v["prediction"] == r["base_class"] == 5)
    assert (smoke_run / "success.png").stat().st_size > 0
    assert (smoke_run / "features.png").stat().st_size > 0
    summary = json.loads((smoke_run / "summary.json").read_text())
    control = summary["settings"]["pair=bird_dog,selection=random,victim=control"]
    assert control["n"] == 3
    with open(write_report(str(smoke_run))) as f:
        assert "| bird_dog | 3 of 3 | finished |" in f.read()


def test_sigkill_after_the_first_chunk_resumes_identically(smoke_run, tmp_path):
    """Killed after its first chunk (two targets, one per device), the rerun
    computes the last target only and still draws Fig. 3 from the saved first one."""
    resumed = assert_resumes_identically(
        SMOKE, tmp_path, smoke_run, killed_when=chunk_committed(0, "bird_dog")
    )
    assert (resumed / "features.png").stat().st_size > 0
