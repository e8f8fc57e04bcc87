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
from jaxpoison.victims import make_train_data, poisoned_batch
from jaxpoison.victims.data import num_examples
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


def test_group_poisons_nest_counts_and_repeat_the_single_base():
    plan = fe.victim_plan((0.3,), (1, 3), 0.3, 2)
    assert fe.count_groups(plan) == {0: (0,), 1: (1,), 2: (3, 4, 5), 3: (2,)}
    sets = jnp.arange(3 * 4, dtype=jnp.float32).reshape(3, 4, 1, 1, 1)
    flat = lambda x: np.asarray(x)[..., 0, 0, 0]  # noqa: E731
    np.testing.assert_array_equal(
        flat(fe.group_poisons(sets, plan, (2,), 3)), [[0, 1, 2]]
    )
    # No optimisation, no watermark, single base: sets 1 and 2, poison 0 of set 0.
    np.testing.assert_array_equal(
        flat(fe.group_poisons(sets, plan, (3, 4, 5), 2)), [[4, 5], [8, 9], [0, 0]]
    )
    assert fe.group_poisons(sets, plan, (0,), 0).shape == (1, 0, 1, 1, 1)


def test_a_victim_trains_on_the_clean_set_plus_exactly_its_poisons():
    """Clean set of 6 rows + 4 spare rows; victims with 2 poisons read 8 rows: the
    6 clean ones, then their 2 poisons labelled with the base class."""
    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1)
    labels = np.array([0, 1, 2, 0, 1, 2, 9, 9, 9, 9], np.int32)
    pool = make_train_data(images, labels)
    poisons = jnp.full((3, 2, 1, 1, 1), 0.5)  # 3 victims x 2 poisons
    data = fe.victim_training_set(pool, 6, poisons, 1)
    assert num_examples(data) == 6 + 2
    victim = data._replace(
        poison_images=data.poison_images[0],
        poison_indices=data.poison_indices[0],
        poison_labels=data.poison_labels[0],
    )
    x, y, *_ = poisoned_batch(victim, data.subset)
    np.testing.assert_allclose(x[:6, 0, 0, 0] * 255, np.arange(6))
    np.testing.assert_allclose(x[6:, 0, 0, 0], 0.5)
    np.testing.assert_array_equal(y, [0, 1, 2, 0, 1, 2, 1, 1])


def test_paired_effect_counts_discordant_targets_and_mcnemar_p():
    """Six targets: n = 50 alone poisons four, n = 1 alone one, both one. Exact
    McNemar: 2 x P(Bin(5, 1/2) <= 1) = 2 x 6/32 = 0.375."""
    hits = [(1, 0), (1, 0), (1, 0), (1, 0), (0, 1), (1, 1)]
    rows = [
        {"pair": "p", "seed": i, "victim": v, "success": bool(hit)}
        for i, pair in enumerate(hits)
        for v, hit in zip(("n=50", "n=1"), pair, strict=True)
    ]
    effect = fe.paired_effect(rows, "n=50", "n=1")
    assert (effect["only_high"], effect["only_low"]) == (4, 1)
    assert effect["n=50"]["successes"] == 5 and effect["n=1"]["successes"] == 2
    assert effect["mcnemar_p"] == pytest.approx(0.375)
    assert fe.mcnemar_p(0, 0) == 1.0 and fe.mcnemar_p(12, 0) == pytest.approx(2**-11)


def test_outlier_effect_compares_selections_with_fisher_exact_test():
    """3 of 4 outlier targets against 1 of 4 random ones at the most poisons: the
    tea-tasting table, two-sided p = 34/70; the other victim is ignored."""
    rows = [
        {
            "pair": "p",
            "seed": i,
            "outlier": outlier,
            "victims": [
                {"victim": "opacity=0.3/n=50", "success": hit},
                {"victim": "opacity=0.3/n=0", "success": True},
            ],
        }
        for i, (outlier, hit) in enumerate(
            [(True, True)] * 3
            + [(True, False)]
            + [(False, True)]
            + [(False, False)] * 3
        )
    ]
    effect = fe.effects(rows, (0.3,), (50,))["outliers"]
    assert effect["outlier"]["successes"] == 3 and effect["random"]["successes"] == 1
    assert effect["fisher_p"] == pytest.approx(34 / 70)


def _finished_run(path, targets, seed0, outlier=False, **config):
    """A workdir as a finished run leaves it: config.json and one row per target."""
    path.mkdir()
    protocol = {k: 1 for k in fe.POOLED_PROTOCOL} | config | {"seed": seed0}
    (path / "config.json").write_text(json.dumps(protocol))
    rows = [
        {"pair": "p", "target_test_index": t, "seed": seed0 + i, "outlier": outlier}
        for i, t in enumerate(targets)
    ]
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_pooled_rows_join_runs_of_one_protocol_with_distinct_targets(tmp_path):
    first = _finished_run(tmp_path / "a", [5, 7], seed0=0)
    second = _finished_run(tmp_path / "b", [9], seed0=100)
    outliers = _finished_run(tmp_path / "c", [7], seed0=0, outlier=True)
    rows = fe.pooled_rows([first, second, outliers])
    assert [r["target_test_index"] for r in rows] == [5, 7, 9, 7]


@pytest.mark.parametrize(
    "second, message",
    [
        (dict(targets=[7], seed0=100), "target 7 of pair p is already"),
        (dict(targets=[8], seed0=1), "seed 1 of pair p is already"),
        (dict(targets=[8], seed0=100, per_class=5), "its per_class differs"),
    ],
)
def test_pooled_rows_refuse_a_repeated_target_seed_or_protocol(
    tmp_path, second, message
):
    first = _finished_run(tmp_path / "a", [5, 7], seed0=0)
    other = _finished_run(tmp_path / "b", **second)
    with pytest.raises(UserInputError, match=message):
        fe.pooled_rows([first, other])
    with pytest.raises(UserInputError, match="not a finished run"):
        fe.pooled_rows([first, str(tmp_path / "missing")])


def test_scaled_learning_rate_matches_paper_steps():
    config = load_config("frogs_e2e.py")
    # 50 per class x 10 = 500 clean images: 4 steps per epoch, paper 391.
    assert config.victim.learning_rate == pytest.approx(1.85e-5 * 391 / 4)
    assert load_config("frogs_e2e.py", "paper_lr").victim.learning_rate == 1.85e-5
    paper = load_config("frogs_e2e.py", "paper")
    assert paper.victim.learning_rate == 1.85e-5 and paper.per_class == 5000
    assert paper.poison_counts == (
        1,
        5,
        10,
        15,
        20,
        25,
        30,
        35,
        40,
        45,
        50,
        55,
        60,
        65,
        70,
    )


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


@pytest.mark.experiment
def test_smoke_run_writes_rows_summary_and_figures(smoke_run):
    rows = read_jsonl(str(smoke_run / "results.jsonl"))
    assert len(rows) == 3 and all(len(r["victims"]) == 5 for r in rows)
    assert {v["n_poisons"] for v in rows[0]["victims"]} == {0, 5}
    assert [r["seed"] for r in rows] == [0, 1, 2]
    # The smoke config's clean set: 10 per class of the 10 classes.
    clean = 10 * load_config("frogs_e2e.py", "smoke").per_class
    for r in rows:
        assert r["clean_train_size"] == clean and len(r["base_test_indices"]) == 5
        for v in r["victims"]:
            assert v["success"] == (v["prediction"] == r["base_class"] == 5)
            assert v["train_size"] == clean + v["n_poisons"]
            assert v["poisons_trained"] == v["n_poisons"]
    assert (smoke_run / "success.png").stat().st_size > 0
    assert (smoke_run / "features.png").stat().st_size > 0
    summary = json.loads((smoke_run / "summary.json").read_text())
    control = summary["settings"]["pair=bird_dog,selection=random,victim=control"]
    assert control["n"] == 3
    with open(write_report(str(smoke_run))) as f:
        assert "| bird_dog | 3 of 3 | finished |" in f.read()


# slow: a second smoke run; the default run keeps the resume contract in
# test_resume.py and test_cli.py (15-minute budget on 2 cores).
@pytest.mark.slow
def test_sigkill_after_the_first_chunk_resumes_identically(smoke_run, tmp_path):
    """Killed after its first chunk (two targets, one per device), the rerun
    computes the last target only and still draws Fig. 3 from the saved first one."""
    resumed = assert_resumes_identically(
        SMOKE, tmp_path, smoke_run, killed_when=chunk_committed(0, "bird_dog")
    )
    assert (resumed / "features.png").stat().st_size > 0
