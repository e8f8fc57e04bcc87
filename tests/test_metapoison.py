"""MetaPoison: CW loss, schedules, the l_inf constraint, ensemble = loop, config."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpoison import UserInputError
from jaxpoison.attacks import metapoison as mp
from jaxpoison.experiments import metapoison as mpx
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


@pytest.mark.parametrize("how", ["vmap", pytest.param("map", marks=pytest.mark.slow)])
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


def test_runlocal_config_is_the_small_variant_and_default_is_paper_size():
    small = load_config("metapoison.py", "runlocal")
    paper = load_config("metapoison.py")
    assert paper.craft.surrogates == 24 and paper.craft.craft_steps == 61
    assert paper.per_class == 500 and paper.num_poisons == 50
    assert small.craft.surrogates == 2 and small.craft.unroll_steps == 2
    mpx.check_config(small)


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


@pytest.mark.slow
def test_run_on_the_shipped_sample_writes_rows_and_summary(tmp_path):
    config = load_config("metapoison.py", "runlocal")
    config.dataset = "cifar10_sample"
    config.per_class = 20
    config.num_poisons = 2
    config.test_images = 50
    config.craft.craft_steps = 2
    config.craft.batch_size = 10
    config.frogs.iterations = 2
    config.victims.scratch.epochs = 1
    config.victims.finetune.epochs = 1
    summary = mpx.run(config, str(tmp_path))
    assert set(summary["results"]) == {
        f"{a}/{v}" for a in mpx.ATTACKS for v in ("scratch", "finetune")
    }
    assert all(r["success"]["n"] == 2 for r in summary["results"].values())
    assert (tmp_path / "results.jsonl").exists()
