"""Class shielding: flipped CE and loss closed forms, generator shape and validity,
the generator's gradient through the dummy victim's training = finite differences,
the outer step; the experiment through the CLI (smoke size, shipped sample) and
resumed from its saved generator after a SIGKILL."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpoison import UserInputError
from jaxpoison.attacks import shielding as sh
from jaxpoison.experiments import shielding as shx
from jaxpoison.report import write_report
from jaxpoison.results import read_jsonl
from tests.cli_runs import (
    assert_resumes_identically,
    assert_same_rows,
    chunk_committed,
    run_cli,
    run_cli_processes,
)
from tests.conftest import load_config


def test_flipped_cross_entropy_closed_form():
    probs = jnp.array([[0.2, 0.5, 0.3], [0.9, 0.05, 0.05], [0.0, 0.0, 1.0]])
    labels = jnp.array([1, 0, 0])
    expected = -(np.log(1 - 0.5) + np.log(1 - 0.9) + np.log(1 - 0.0)) / 3
    np.testing.assert_allclose(
        sh.flipped_cross_entropy(probs, labels), expected, rtol=1e-6
    )


def test_shielding_loss_combines_the_three_terms():
    lp = jnp.array([[2.0, 0.0]])  # poisons, shield label 0
    lc = jnp.array([[0.0, 1.0]])  # control, label 1
    lt = jnp.array([[1.0, 3.0]])  # protected, label 1
    ce_p = np.log1p(np.exp(-2.0))
    ce_c = np.log1p(np.exp(-1.0))
    p_t = 1 / (1 + np.exp(-2.0))
    t = 0.7
    expected = ((ce_p + ce_c) / 2 + t * -np.log(1 - p_t)) / 2
    value = sh.shielding_loss(
        lp, jnp.array([0]), lc, jnp.array([1]), lt, jnp.array([1]), t
    )
    np.testing.assert_allclose(value, expected, rtol=1e-6)


@pytest.mark.parametrize("bound", ["clip", "tanh"])
def test_generator_output_shape_and_valid_pixels(bound):
    cfg = sh.ShieldConfig(bound=bound, hidden=64, zero_init=False)
    params = sh.init_generator(jax.random.key(0), 8, (32, 32, 3), cfg)
    assert params["dense2"]["kernel"].shape == (64, 768)  # 16 x 16 x 3
    # Large weights push residuals far past the pixel range.
    params = jax.tree.map(lambda a: 50.0 * a, params)
    rng = np.random.default_rng(0)
    shield = jnp.asarray(rng.uniform(size=(5, 32, 32, 3)), jnp.float32)
    shield = shield.at[0].set(0.0).at[1].set(1.0)
    fs, ft = (jnp.asarray(rng.normal(size=(5, 8)), jnp.float32) for _ in range(2))
    poisons = sh.generate(params, shield, fs, ft, cfg)
    assert poisons.shape == (5, 32, 32, 3)
    assert float(poisons.min()) >= 0.0 and float(poisons.max()) <= 1.0
    r = sh.residual(params, fs, ft, cfg, 32)
    assert r.shape == (5, 32, 32, 3) and float(jnp.abs(r).max()) > 1.0
    if bound == "tanh":
        assert float(jnp.abs(poisons - shield).max()) <= cfg.epsilon + 1e-6
        assert float(jnp.abs(poisons - shield).max()) > 0.9 * cfg.epsilon


def _smooth_extractor(dim: int = 6):
    """A stand-in frozen extractor: mean colour per quadrant, projected, tanh."""
    w = jnp.asarray(np.random.default_rng(3).normal(size=(12, dim)))

    def extract(x):
        q = x.reshape(x.shape[0], 2, 16, 2, 16, 3).mean(axis=(2, 4))
        return jnp.tanh(q.reshape(x.shape[0], 12) @ w.astype(x.dtype) * 3.0)

    return extract


def test_generator_gradient_through_dummy_victim_training_matches_fd():
    """d L / d generator, through 4 unrolled Adam steps of the fresh head, float64."""
    cfg = sh.ShieldConfig(
        hidden=16,
        sub_batch=3,
        sub_batches=4,
        bound="tanh",
        victim_lr=0.05,
        zero_init=False,
    )
    extract = _smooth_extractor()
    with jax.enable_x64(True):
        params = jax.tree.map(
            lambda a: jnp.asarray(a, jnp.float64),
            sh.init_generator(jax.random.key(0), 6, (32, 32, 3), cfg),
        )
        rng = np.random.default_rng(1)
        p = cfg.poisons_per_step
        shield = jnp.asarray(rng.uniform(0.1, 0.9, (p, 32, 32, 3)))
        other = jnp.asarray(rng.uniform(0.1, 0.9, (2 * p, 32, 32, 3)))
        inputs = sh.StepInputs(
            shield=shield,
            shield_features=extract(shield),
            shield_labels=jnp.zeros(p, jnp.int32),
            protected_features=extract(other[:p]),
            protected_labels=jnp.ones(p, jnp.int32),
            control_features=extract(other[p:]),
            control_labels=jnp.full(p, 2, jnp.int32),
        )
        loss = sh.make_outer_loss(extract, cfg, 3)
        f = jax.jit(lambda q: loss(q, inputs, jax.random.key(4))[0])
        direction = jax.tree.map(
            lambda a: jnp.asarray(rng.normal(size=a.shape)), params
        )
        grad = jax.grad(f)(params)
        analytic = sum(
            float(jnp.vdot(g, d))
            for g, d in zip(
                jax.tree.leaves(grad), jax.tree.leaves(direction), strict=True
            )
        )
        eps = 1e-5
        shift = lambda s: jax.tree.map(lambda a, d: a + s * d, params, direction)
        fd = float(f(shift(eps)) - f(shift(-eps))) / (2 * eps)
        # The dummy victim's head is part of the path: without its training the
        # gradient differs (the TensorFlow original's regenerate trick).
        assert abs(analytic) > 1e-4
    np.testing.assert_allclose(analytic, fd, rtol=1e-5)


def test_dummy_victim_trains_one_step_per_sub_batch_of_ten():
    cfg = sh.ShieldConfig(sub_batch=10, sub_batches=3, victim_optimizer="sgd")
    feats = jnp.asarray(np.random.default_rng(0).normal(size=(30, 4)), jnp.float32)
    head = sh.fresh_head(jax.random.key(0), 4, 3)
    labels = jnp.zeros(30, jnp.int32)
    trained, losses = sh.train_dummy_victim(head, feats, labels, None, cfg)
    assert losses.shape == (3,)
    # By hand: three SGD steps, each on the next 10 rows.
    h = head
    for i in range(3):
        f, y = feats[10 * i : 10 * (i + 1)], labels[10 * i : 10 * (i + 1)]

        def ce(h, f=f, y=y):
            return sh.cross_entropy(sh.head_logits(h, f), y)

        g = jax.grad(ce)(h)
        h = jax.tree.map(lambda a, b: a - cfg.victim_lr * b, h, g)
    np.testing.assert_allclose(trained.kernel, h.kernel, rtol=1e-5, atol=1e-7)


def test_zero_init_generator_starts_at_the_shield_images():
    cfg = sh.ShieldConfig(hidden=32)
    params = sh.init_generator(jax.random.key(0), 8, (32, 32, 3), cfg)
    shield = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 32, 32, 3)))
    feats = jnp.ones((2, 8))
    np.testing.assert_array_equal(
        sh.generate(params, shield, feats, feats, cfg), shield
    )


def test_runlocal_config_and_bad_input():
    config = load_config("shielding.py", "runlocal")
    cfg, control = shx.check_config(config)
    assert cfg.poisons_per_step == 100 and cfg.sub_batch == 10
    assert control == (0, 1, 2, 4, 6, 7, 8, 9)
    shx.check_config(load_config("shielding.py", "smoke"))
    config.control_classes = (5,)
    with pytest.raises(UserInputError, match="must differ"):
        shx.check_config(config)
    with pytest.raises(UserInputError, match="bound"):
        dataclasses.replace(cfg, bound="sigmoid")


def test_paper_argument_takes_the_originals_settings_unless_given():
    shield = load_config("shielding.py", "paper").shield
    assert (shield.clean_per_sub_batch, shield.victim_lr) == (0, 0.001)
    assert (shield.bound, shield.zero_init) == ("clip", False)
    assert load_config("shielding.py", "paper,clean=5").shield.clean_per_sub_batch == 5


def test_outer_step_is_one_adam_step_on_the_loss_gradient():
    cfg = sh.ShieldConfig(
        hidden=8, latent_size=4, sub_batch=3, sub_batches=2, zero_init=False
    )
    w = jnp.asarray(np.random.default_rng(3).normal(size=(3, 6)), jnp.float32)

    def extract(x):  # a stand-in frozen extractor on 8 x 8 images
        return jnp.tanh(x.mean(axis=(1, 2)) @ w)

    rng = np.random.default_rng(0)
    p = cfg.poisons_per_step
    shield = jnp.asarray(rng.uniform(size=(p, 8, 8, 3)), jnp.float32)
    inputs = sh.StepInputs(
        shield=shield,
        shield_features=extract(shield),
        shield_labels=jnp.zeros(p, jnp.int32),
        protected_features=extract(shield[::-1]),
        protected_labels=jnp.ones(p, jnp.int32),
        control_features=extract(shield[::-1]),
        control_labels=jnp.full(p, 2, jnp.int32),
    )
    state = sh.init(jax.random.key(0), 6, (8, 8, 3), cfg)
    step = jax.jit(sh.make_step(extract, cfg, 3))
    new, aux = step(state, inputs, jax.random.key(1))
    loss = sh.make_outer_loss(extract, cfg, 3)
    grads = jax.jit(jax.grad(lambda q: loss(q, inputs, jax.random.key(1))[0]))(
        state.params
    )
    tx = sh.generator_optimizer(cfg)
    updates, _ = tx.update(grads, tx.init(state.params), state.params)
    expected = jax.tree.map(jnp.add, state.params, updates)
    for a, b in zip(
        jax.tree.leaves(new.params), jax.tree.leaves(expected), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert int(new.step) == 1 and set(aux) == set(shx.METRICS)


SMOKE = ["--config", "configs/shielding.py:smoke"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One uninterrupted smoke run through the CLI (shared by the tests below)."""
    workdir = tmp_path_factory.mktemp("shielding") / "whole"
    run_cli(SMOKE, workdir)
    return workdir


@pytest.mark.experiment
def test_smoke_run_writes_rows_summary_and_plot(smoke_run):
    rows = read_jsonl(str(smoke_run / "results.jsonl"))
    # Evaluation points 0, 2, 4: held-out rows, training rows after step 0, and
    # the baseline (unmodified shield images) once.
    assert [(r["step"], r["split"], r["poisons"]) for r in rows] == [
        (0, "held_out", "generated"),
        (0, "held_out", "unmodified"),
        (2, "held_out", "generated"),
        (2, "train", "generated"),
        (4, "held_out", "generated"),
        (4, "train", "generated"),
    ]
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert summary["final"]["step"] == 4 and "train" in summary["final"]
    assert sorted(os.listdir(smoke_run / "generator" / "checkpoints")) == ["2", "4"]
    assert os.path.getsize(smoke_run / "accuracy.png") > 0
    with open(write_report(str(smoke_run))) as f:
        assert "protected_accuracy" in f.read()


@pytest.mark.slow  # ~30 s; the default run keeps test_resume.py, the CLI's kills
def test_sigkill_after_a_saved_generator_resumes_identically(smoke_run, tmp_path):
    # Killed once the segment ending at step 2 is committed: the rerun restores
    # the generator saved at step 2 and computes steps 2-3 again.
    assert_resumes_identically(
        SMOKE, tmp_path, smoke_run, killed_when=chunk_committed(1)
    )


@pytest.mark.slow
def test_two_processes_train_the_one_process_generator(smoke_run, tmp_path):
    # Every process saves its own generator (`resume_steps`' checkpoints, each
    # in its own workdir) as numpy arrays.
    run_cli_processes(SMOKE, tmp_path / "run")
    assert_same_rows(tmp_path / "run", smoke_run)
