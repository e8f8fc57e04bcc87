"""MetaPoison: CW loss, schedules, the l_inf constraint, ensemble = loop, the pure
step, config; the experiment through the CLI (smoke size, shipped sample) and
resumed after a SIGKILL."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpoison import UserInputError
from jaxpoison.attacks import metapoison as mp
from jaxpoison.experiments import metapoison as mpx
from jaxpoison.report import write_report
from jaxpoison.results import read_jsonl
from tests.cli_runs import file_exists, kill_when, run_cli, run_python
from tests.conftest import load_config
from tests.test_unroll import SIZE, tiny_data, tiny_model


def test_cw_margin_and_cross_entropy_closed_forms():
    logits = jnp.array([[1.0, 3.0, 2.0], [0.0, 0.0, 500.0]])
    # Row 0 toward class 1: max other (2) - 3 = -1; row 1 toward 0: 500 - 0.
    np.testing.assert_allclose(
        mp.adversarial_loss(logits, jnp.array([1, 0]), "cw"), (-1.0 + 500.0) / 2
    )
    # The clamp: 0 - 500 = -500 is clamped at -100.
    np.testing.assert_allclose(
        mp.adversarial_loss(logits[1:], jnp.array([2]), "cw"), -100.0
    )
    expected = np.log(np.exp(1.0) + np.exp(3.0) + np.exp(2.0)) - 3.0
    np.testing.assert_allclose(
        mp.adversarial_loss(logits[:1], jnp.array([1]), "xent"), expected, rtol=1e-6
    )


def test_schedules_follow_the_authors_formulas():
    cfg = mp.MetaPoisonConfig()
    rate = cfg.craft_rate
    # Squared warmup over 5 steps, x0.1 at 20 and 40 (utils.py cr_schedule).
    np.testing.assert_allclose(mp.craft_rate(cfg, 0), rate * (1 / 5) ** 2)
    np.testing.assert_allclose(mp.craft_rate(cfg, 4), rate)
    np.testing.assert_allclose(mp.craft_rate(cfg, 20), rate * 0.1)
    np.testing.assert_allclose(mp.craft_rate(cfg, 45), rate * 0.01)
    # Linear warmup over 5 epochs, x0.1 at 100/150/200 (lr_schedule).
    np.testing.assert_allclose(mp.surrogate_lr(cfg, 0), 0.1 / 5, rtol=1e-5)
    np.testing.assert_allclose(mp.surrogate_lr(cfg, 7), 0.1)
    np.testing.assert_allclose(mp.surrogate_lr(cfg, 160), 0.1 * 0.01)


def test_projection_keeps_the_linf_ball_and_valid_pixels():
    rng = np.random.default_rng(0)
    bases = jnp.asarray(rng.uniform(size=(4, 5, 5, 3)), jnp.float32)
    bases = bases.at[0].set(0.0).at[1].set(1.0)  # pixels at the range's ends
    delta = mp.project(jnp.asarray(rng.normal(size=bases.shape)), bases, 8 / 255)
    assert float(jnp.abs(delta).max()) <= 8 / 255 + 1e-7
    poisons = bases + delta
    assert float(poisons.min()) >= 0.0 and float(poisons.max()) <= 1.0
    assert float(delta[0].min()) >= 0.0 and float(delta[1].max()) <= 0.0


SMOKE = ["--config", "configs/metapoison.py:smoke"]


def _problem():
    images, labels = tiny_data(30)
    base_rows = np.flatnonzero(labels == 2)[:3]
    target = np.random.default_rng(5).uniform(size=(1, SIZE, SIZE, 3))
    return mp.CraftProblem(
        images=images,
        labels=labels,
        clean_rows=np.setdiff1d(np.arange(30), base_rows),
        bases=images[base_rows].astype(np.float32) / 255,
        base_labels=labels[base_rows],
        targets=target.astype(np.float32),
        adv_labels=np.array([2], np.int32),
    )


CRAFT = mp.MetaPoisonConfig(
    craft_steps=4,
    unroll_steps=2,
    surrogates=2,
    stagger=1,
    craft_rate=0.02,
    craft_warmup=0,
    learning_rate=0.3,
    warmup_epochs=0,
    batch_size=8,
    poisons_per_batch=2,  # 3 poisons: two chunks, the second padded
)


def test_crafted_poisons_stay_in_the_eps_ball_and_the_ensemble_restarts():
    model = tiny_model()
    problem = _problem()
    poisons, info = mp.craft(
        model, model.init(jax.random.key(0)), problem, CRAFT, jax.random.key(1)
    )
    linf = float(jnp.abs(poisons - problem.bases).max())
    assert 7.9 / 255 < linf <= 8 / 255 + 1e-6
    assert float(poisons.min()) >= 0.0 and float(poisons.max()) <= 1.0
    # Staggered epochs advance each step and wrap at M * stagger = 2.
    epochs = [h["surrogate_epochs"] for h in info["history"]]
    assert epochs == [[0, 1], [1, 0], [0, 1], [1, 0]]
    assert all(np.isfinite(h["adversarial_loss"]) for h in info["history"])


@pytest.mark.parametrize(
    "how",
    [
        "vmap",
        # On this process's one device; two: the subprocess test below.
        pytest.param("devices", marks=pytest.mark.slow),
        pytest.param("map", marks=pytest.mark.slow),
    ],
)
def test_vmapped_ensemble_crafts_the_same_poisons_as_the_host_loop(how):
    model = tiny_model()
    problem = _problem()
    variables = model.init(jax.random.key(0))
    cfg = dataclasses.replace(CRAFT, craft_steps=1)
    looped, a = mp.craft(model, variables, problem, cfg, jax.random.key(2))
    vmapped, b = mp.craft(
        model,
        variables,
        problem,
        dataclasses.replace(cfg, ensemble=how),
        jax.random.key(2),
    )
    np.testing.assert_allclose(looped, vmapped, atol=1e-5)
    np.testing.assert_allclose(
        [h["adversarial_loss"] for h in a["history"]],
        [h["adversarial_loss"] for h in b["history"]],
        rtol=1e-4,
    )


DEVICES_SCRIPT = """
    import dataclasses

    import jax
    import numpy as np

    from jaxpoison.attacks import metapoison as mp
    from tests.test_metapoison import CRAFT, _problem
    from tests.test_unroll import tiny_model

    assert jax.device_count() == 2, jax.devices()
    # 3 surrogates on 2 devices (one padded slot), staggered 2 epochs apart (the
    # warm-up's rounds leave surrogates idle), restarting within the 2 craft steps.
    cfg = dataclasses.replace(CRAFT, craft_steps=2, surrogates=3, stagger=2)
    assert mp.member_mesh(cfg.surrogates).size == 2
    model = tiny_model()
    problem = _problem()
    variables = model.init(jax.random.key(0))
    runs = [
        mp.craft(model, variables, problem, dataclasses.replace(cfg, ensemble=how),
                 jax.random.key(4))
        for how in ("loop", "devices")
    ]
    (looped, a), (dealt, b) = runs
    assert [h["surrogate_epochs"] for h in b["history"]] == [[0, 2, 4], [1, 3, 5]]
    assert [h["surrogate_epochs"] for h in a["history"]] == [[0, 2, 4], [1, 3, 5]]
    assert float(np.abs(looped - problem.bases).max()) > 1e-3  # crafting moved them
    np.testing.assert_allclose(looped, dealt, atol=1e-5)
    np.testing.assert_allclose(
        [h["adversarial_loss"] for h in a["history"]],
        [h["adversarial_loss"] for h in b["history"]],
        rtol=1e-4,
    )
    print("ok")
"""


@pytest.mark.heavy
def test_surrogates_dealt_over_two_devices_craft_the_same_poisons_as_the_loop():
    run_python(DEVICES_SCRIPT, devices=2)


def test_step_is_pure_and_craft_is_its_driver_loop():
    model = tiny_model()
    problem = _problem()
    variables = model.init(jax.random.key(0))
    cfg = dataclasses.replace(CRAFT, craft_steps=2)
    state = mp.init(model, variables, problem, cfg, jax.random.key(3))
    step = mp.make_step(model, variables, cfg)
    once, aux = step(state, problem)
    again, aux_again = step(state, problem)  # the same state in: the same out
    assert aux == aux_again and once.step == 1
    np.testing.assert_array_equal(
        jax.random.key_data(once.key), jax.random.key_data(again.key)
    )
    leaves = [jax.tree.leaves(s._replace(key=None)) for s in (once, again)]
    for a, b in zip(*leaves, strict=True):
        np.testing.assert_array_equal(a, b)
    twice, _ = step(once, problem)
    poisons, info = mp.craft(model, variables, problem, cfg, jax.random.key(3))
    np.testing.assert_array_equal(poisons, mp.centres(problem, cfg) + twice.delta)
    assert info["history"][0]["adversarial_loss"] == aux["adversarial_loss"]


def test_config_variants_and_the_default_crafts_per_victim_kind():
    small = load_config("metapoison.py", "runlocal")
    quick = load_config("metapoison.py", "quickstart")
    assert quick.craft.surrogates == 24 and quick.craft.craft_steps == 61
    assert quick.per_class == 500 and quick.num_poisons == 50
    paper = load_config("metapoison.py", "paper")
    assert paper.per_class == 5000 and paper.num_poisons == 500
    crafts = mpx.check_config(load_config("metapoison.py"))[0]
    # The default: fine-tuned victims get poisons from fine-tuned surrogates,
    # from-scratch victims the paper's (surrogates trained from scratch).
    assert {k: (c.surrogate_init, kinds) for k, (c, kinds) in crafts.items()} == {
        "metapoison_finetune": ("pretrained", ("finetune",)),
        "metapoison_scratch": ("scratch", ("scratch",)),
    }
    assert list(mpx.check_config(small)[0]) == ["metapoison"]  # one run for both
    assert small.craft.surrogates == 2 and small.craft.unroll_steps == 2
    mpx.check_config(small)
    smoke = load_config("metapoison.py", "smoke")
    assert smoke.dataset == "cifar10_sample" and smoke.num_targets == 2
    mpx.check_config(smoke)


def test_each_victim_kind_trains_on_the_poisons_crafted_for_it():
    config = load_config("metapoison.py")
    config.num_targets, config.poison_8bit = 1, False
    crafts = mpx.check_config(config)[0]
    shape = (2, 4, 4, 3)
    bases, a, b, frogs = (np.full(shape, v, np.float32) for v in (0.1, 0.2, 0.3, 0.4))
    setup = {
        "bases": bases,
        "target_rows": np.array([7], np.int32),
        "targets": np.zeros((1, 4, 4, 3), np.float32),
    }
    crafted = [{"metapoison_finetune": a, "metapoison_scratch": b, "frogs": frogs}]
    specs = mpx.victim_specs(config, setup, crafted, crafts, ("finetune", "scratch"))
    assert list(specs["attack"]) == list(mpx.ATTACKS)
    poisons = dict(zip(specs["attack"], specs["poisons"], strict=True))
    for attack, (finetune, scratch) in {
        "clean": (0.1, 0.1),
        "metapoison": (0.2, 0.3),
        "frogs": (0.4, 0.4),
    }.items():
        np.testing.assert_allclose(poisons[attack][0], finetune)
        np.testing.assert_allclose(poisons[attack][1], scratch)


def test_verdict_reads_intervals_and_margins():
    def cell(low, high, margin):
        return {"ci95_low": low, "ci95_high": high, "mean_cw_margin": margin}

    results = {
        "attack=clean,victim=finetune": cell(0.0, 0.3, 4.0),
        "attack=metapoison,victim=finetune": cell(0.6, 1.0, -3.0),
        "attack=clean,victim=scratch": cell(0.0, 0.5, 1.0),
        "attack=metapoison,victim=scratch": cell(0.1, 0.7, 0.5),
    }
    assert mpx.verdict(results, ("finetune", "scratch")) == {
        "finetune": {"above_clean": True, "margin_drop": -7.0},
        "scratch": {"above_clean": False, "margin_drop": -0.5},
    }


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("dataset", "imagenet", "unknown dataset"),
        ("poison_class", 2, "must differ"),
        ("num_poisons", 600, "num_poisons"),
        ("craft.objective", "hinge", "unknown objective"),
        ("craft.ensemble", "pmap", "unknown ensemble"),
        ("victims.finetune.epoch", 3, "unknown training option"),
    ],
)
def test_bad_config_is_a_one_line_user_input_error(key, value, message):
    config = load_config("metapoison.py", "runlocal")
    *path, last = key.split(".")
    node = config
    for part in path:
        node = node[part]
    node[last] = value
    with pytest.raises(UserInputError, match=message) as info:
        mpx.check_config(config)
    assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One uninterrupted smoke run through the CLI (shared by the tests below)."""
    workdir = tmp_path_factory.mktemp("metapoison") / "whole"
    run_cli(SMOKE, workdir)
    return workdir


@pytest.mark.experiment
def test_smoke_run_writes_poisons_rows_summary_and_plot(smoke_run):
    rows = read_jsonl(str(smoke_run / "results.jsonl"))
    # 2 targets x 3 attacks x 2 victims x 2 seeds, targets outermost.
    assert len(rows) == 24 and [r["target"] for r in rows[::12]] == [0, 1]
    assert {(r["attack"], r["victim"]) for r in rows} == {
        (a, v) for a in mpx.ATTACKS for v in ("finetune", "scratch")
    }
    for r in rows:  # 8-bit poisons in the eps-ball (clean: rounding only)
        assert r["poison_linf"] <= 8 / 255 + 1e-6
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert all(s["n"] == 4 for s in summary["results"].values())
    assert [len(h) for h in summary["craft_history"]] == [2, 2]
    for t in (0, 1):
        with np.load(smoke_run / "poisons" / f"target_{t:03d}.npz") as f:
            assert f["metapoison"].shape == f["frogs"].shape == (2, 32, 32, 3)
    assert os.path.getsize(smoke_run / "craft_loss.png") > 0
    with open(write_report(str(smoke_run))) as f:
        assert "attack" in f.read()


@pytest.mark.slow  # ~50 s; the default run keeps test_resume.py, the CLI's kills
def test_sigkill_after_the_first_target_resumes_without_crafting_it_again(
    smoke_run, tmp_path
):
    workdir = tmp_path / "killed"
    kill_when(SMOKE, workdir, file_exists("poisons/target_000.npz"))
    assert not (workdir / "results.jsonl").exists()
    saved = workdir / "poisons" / "target_000.npz"
    before = saved.stat().st_mtime_ns
    proc = run_cli(SMOKE, workdir)
    assert "target 0 craft step" not in proc.stdout  # loaded, not crafted again
    assert "target 1 craft step" in proc.stdout
    assert saved.stat().st_mtime_ns == before
    resumed = (workdir / "results.jsonl").read_bytes()
    assert resumed == (smoke_run / "results.jsonl").read_bytes()
