"""Gradient matching (Witches' Brew): the loss and its gradient against a looped
per-poison computation and central differences (float64, a tiny smooth convnet),
the signed-Adam step, the eps-ball and the trial axis, the schedule, the ConvNet."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpoison import UserInputError
from jaxpoison.attacks import gradient_matching as gm
from jaxpoison.attacks.interop import load_benchmark_format, load_poisons_npz
from jaxpoison.experiments import gradient_matching as gmx
from jaxpoison.models import get_model
from jaxpoison.results import read_jsonl
from jaxpoison.victims.augment import random_crop_flip
from tests.cli_runs import (
    assert_same_rows,
    file_exists,
    kill_when,
    run_cli,
    run_cli_processes,
)
from tests.conftest import load_config
from tests.test_unroll import SIZE, tiny_model

EPS = 8 / 255


MODEL = tiny_model()  # one instance: jitted functions keyed on it compile once


def _problem(seed: int = 0, n: int = 3, dtype=jnp.float32) -> gm.GMProblem:
    """One problem on the tiny model: n bases of class 1, target toward class 2."""
    variables = jax.tree.map(
        lambda a: jnp.asarray(a, dtype), MODEL.init(jax.random.key(seed))
    )
    rng = np.random.default_rng(seed)
    bases = jnp.asarray(rng.uniform(0.1, 0.9, (n, SIZE, SIZE, 3)), dtype)
    target = jnp.asarray(rng.uniform(0.1, 0.9, (1, SIZE, SIZE, 3)), dtype)
    target_grad = jax.jit(gm.target_gradient, static_argnums=0)(
        MODEL, variables, target, jnp.array([2])
    )
    return gm.GMProblem(variables, bases, jnp.ones(n, jnp.int32), target_grad)


def _looped_objective(problem, delta, key, poison_batch):
    """The objective rebuilt by hand: the same crop/flip, then per batch the mean
    of per-poison parameter gradients taken one at a time in a Python loop, and B
    as the cosine of the flattened (concatenated) parameter vectors; summed."""
    x = random_crop_flip(key, problem.bases + delta, 1)
    t = jnp.concatenate([jnp.ravel(g) for g in jax.tree.leaves(problem.target_grad)])
    total = 0.0
    for start in range(0, x.shape[0], poison_batch):
        grads = [
            gm.cross_entropy_gradient(
                MODEL, problem.variables, x[i : i + 1], problem.labels[i : i + 1]
            )
            for i in range(start, min(start + poison_batch, x.shape[0]))
        ]
        mean = jax.tree.map(lambda *g: sum(g) / len(g), *grads)
        p = jnp.concatenate([jnp.ravel(g) for g in jax.tree.leaves(mean)])
        total += 1.0 - jnp.dot(p, t) / (jnp.linalg.norm(p) * jnp.linalg.norm(t))
    return total


@pytest.mark.heavy
def test_objective_and_its_poison_gradient_equal_a_looped_computation_and_fd():
    """Float64: the objective (3 poisons in batches of 2, the second padded with a
    zero-weight row; crop/flip on) and its gradient w.r.t. the perturbation equal
    the per-poison loop's, and the gradient equals central differences (second
    order through the custom-VJP convolutions and the augmentation)."""
    config = gm.GMConfig(poison_batch=2, augment=True, crop_padding=1)
    with jax.enable_x64(True):
        problem = _problem(seed=1, dtype=jnp.float64)
        key = jax.random.key(3)
        batched = jax.jit(
            jax.value_and_grad(
                lambda d: gm.poison_objective(MODEL, config, problem, d, key),
                has_aux=True,
            )
        )
        looped = jax.jit(
            jax.value_and_grad(lambda d: _looped_objective(problem, d, key, 2))
        )
        rng = np.random.default_rng(2)
        delta = jnp.asarray(rng.uniform(-EPS, EPS, problem.bases.shape))
        direction = jnp.asarray(rng.normal(size=delta.shape))
        (total, mean), grad = batched(delta)
        looped_total, looped_grad = looped(delta)
        h = 1e-5
        plus, minus = batched(delta + h * direction), batched(delta - h * direction)
        fd = float(plus[0][0] - minus[0][0]) / (2 * h)
        analytic = float(jnp.vdot(grad, direction))
        total, mean, grad, looped_total, looped_grad = jax.device_get(
            (total, mean, grad, looped_total, looped_grad)
        )
    assert 0.1 < mean < 1.9  # neither aligned nor opposed already
    np.testing.assert_allclose(total, looped_total, rtol=1e-12)
    np.testing.assert_allclose(mean, total / 2, rtol=1e-12)
    assert np.abs(grad).max() > 1e-3
    np.testing.assert_allclose(grad, looped_grad, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(analytic, fd, rtol=1e-6)


def _stack(*problems):
    return jax.tree.map(lambda *a: jnp.stack(a), *problems)


def test_signed_adam_steps_the_eps_ball_and_the_trial_axis():
    """One program set (T = 2 problems, R = 2 restarts, the default unrolled
    restarts): the first signed-Adam update is g / (|g| + 1e-8) = +-1 (bias
    correction), so every pixel not stopped by the ball moves by exactly tau *
    std_c; `craft` is the driver loop of these steps; every poison is within eps
    of its base and in [0, 1], many on the ball's surface; the kept restart has the
    lowest final loss; the problems crafted in the other order get the same
    poisons (no cross-talk along the vmapped trial axis)."""
    tau = 0.05
    config = gm.GMConfig(steps=3, restarts=2, step_size=tau, augment=False)
    config = dataclasses.replace(config, epsilon=EPS, schedule=False)
    problems = [_problem(seed=s) for s in (0, 1)]
    stacked = _stack(*problems)
    keys = jax.random.split(jax.random.key(7), 2)
    init, step, select = gm._programs(MODEL, config)
    states = [init(stacked, keys)]
    for _ in range(config.steps):
        states.append(step(states[-1], stacked)[0])
    moved = np.abs(np.asarray(states[1].delta - states[0].delta))
    interior = np.abs(np.asarray(states[1].delta)) < EPS - 1e-6
    rate = np.broadcast_to(tau * np.asarray(gm.CIFAR10_STD, np.float32), moved.shape)
    assert interior.mean() > 0.3
    np.testing.assert_allclose(moved[interior], rate[interior], rtol=1e-4)
    assert np.all(moved <= rate + 1e-6)

    poisons, info = gm.craft(MODEL, stacked, config, keys)
    np.testing.assert_array_equal(poisons, select(states[-1], stacked)[0])
    assert poisons.shape == (2, 3, SIZE, SIZE, 3) and info["loss"].shape == (3, 2, 2)
    for t, problem in enumerate(problems):
        assert info["restart"][t] == np.argmin(info["loss"][-1, t])
        change = np.abs(np.asarray(poisons[t]) - np.asarray(problem.bases))
        assert change.max() <= EPS + 1e-6 and np.mean(change > EPS - 1e-6) > 0.3
    assert float(poisons.min()) >= 0.0 and float(poisons.max()) <= 1.0
    swapped, swapped_info = gm.craft(MODEL, _stack(*problems[::-1]), config, keys[::-1])
    np.testing.assert_allclose(poisons, swapped[::-1], atol=1e-6)
    np.testing.assert_allclose(info["loss"], swapped_info["loss"][:, ::-1], rtol=1e-5)


def test_learning_rate_follows_forests_milestones():
    config = gm.GMConfig(steps=250)
    assert gm.milestones(250) == (93, 156, 218)
    rates = [float(gm.learning_rate(config, s)) for s in (0, 92, 93, 156, 218, 249)]
    np.testing.assert_allclose(rates, [0.1, 0.1, 0.01, 1e-3, 1e-4, 1e-4], rtol=1e-6)
    flat = dataclasses.replace(config, schedule=False)
    assert float(gm.learning_rate(flat, 240)) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"init": "gauss"}, "unknown init"),
        ({"restarts": 0}, "restarts >= 1"),
        ({"pixel_scale": (0.2, -1.0, 0.3)}, "pixel_scale"),
    ],
)
def test_bad_settings_are_one_line_user_input_errors(kwargs, message):
    with pytest.raises(UserInputError, match=message) as info:
        gm.GMConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_craft_refuses_bases_without_a_trial_axis_or_in_0_255():
    model, config = MODEL, gm.GMConfig(steps=1, restarts=1)
    problem = _problem()
    with pytest.raises(UserInputError, match="leading trial axis"):
        gm.craft(model, problem, config, jax.random.split(jax.random.key(0), 1))
    bad = _stack(problem._replace(bases=problem.bases * 255))
    with pytest.raises(UserInputError, match="divide by 255"):
        gm.craft(model, bad, config, jax.random.split(jax.random.key(0), 1))


def test_convnet_small_gives_logits_and_64_d_features():
    model = get_model("convnet_small")
    variables = jax.eval_shape(model.init, jax.random.key(0))
    logits, features = jax.eval_shape(
        model.apply, variables, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    )
    assert logits.shape == (2, 10) and features.shape == (2, 64)
    count = sum(np.prod(x.shape) for x in jax.tree.leaves(variables["params"]))
    assert count == 3 * 9 * 16 + 16 * 9 * 32 + 32 * 9 * 64 + 2 * (16 + 32 + 64) + 650


def test_paper_config_is_the_published_size_and_default_fits_a_cpu():
    paper = load_config("gradient_matching.py", "paper")
    assert (paper.model, paper.num_setups, paper.num_poisons) == ("resnet18", 100, 500)
    assert paper.per_class == 5000 and paper.craft.epsilon == pytest.approx(8 / 255)
    assert (paper.craft.steps, paper.craft.restarts) == (250, 8)
    for cfg in (paper.victim, paper.surrogate):  # forest's "conservative" strategy
        assert (cfg.epochs, tuple(cfg.lr_milestones)) == (40, (14, 24, 35))
        assert (cfg.learning_rate, cfg.weight_decay, cfg.nesterov) == (0.1, 5e-4, True)
    default = load_config("gradient_matching.py")
    assert default.model == "convnet_small" and default.num_poisons == 50
    assert default.num_poisons / (10 * default.per_class) == 0.01  # the 1% budget
    assert load_config("gradient_matching.py", "paper,eps=16").craft.epsilon == 16 / 255


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("clean_seeds", 5, "clean_seeds=5"),
        ("victim.mode", "linear", "trained from scratch"),
        ("craft.init", "ones", "unknown init"),
    ],
)
def test_bad_config_is_a_one_line_user_input_error(key, value, message):
    config = load_config("gradient_matching.py", "runlocal")
    *path, last = key.split(".")
    node = config
    for part in path:
        node = node[part]
    node[last] = value
    with pytest.raises(UserInputError, match=message) as info:
        gmx.check_config(config)
    assert "\n" not in str(info.value)


SMOKE = ["--config", "configs/gradient_matching.py:smoke"]


@pytest.fixture(scope="module")
def smoke_run(cifar_tfds_dir, shared_data, tmp_path_factory):
    """One uninterrupted smoke run through the CLI (shared by the tests below)."""
    args = [*SMOKE, "--data_dir", cifar_tfds_dir]
    workdir = tmp_path_factory.mktemp("gradient_matching") / "whole"
    run_cli(args, workdir)
    return args, workdir


@pytest.mark.slow
@pytest.mark.realdata
def test_smoke_run_writes_rows_poisons_summary_and_benchmark_format(smoke_run):
    _, workdir = smoke_run
    rows = read_jsonl(str(workdir / "results.jsonl"))
    # 2 setups x (1 poisoned + 1 clean victim), setups outermost.
    assert [(r["setup"], r["attack"]) for r in rows] == [
        (s, a) for s in (0, 1) for a in ("gradient_matching", "clean")
    ]
    for r in rows:  # rounded 8-bit poisons stay in the 8/255 ball
        assert r["poison_linf"] <= 8 / 255 + 1e-6
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["results"]["attack=gradient_matching"]["n"] == 2
    assert summary["published_success_resnet18"] == 0.45
    poisons = load_poisons_npz(str(workdir / "poisons.npz"))
    assert poisons["poisons"].shape == (2, 2, 32, 32, 3)
    setup1 = load_benchmark_format(str(workdir / "benchmark_format" / "setup_001"))
    np.testing.assert_array_equal(setup1["poisons"], poisons["poisons"][1])
    with np.load(workdir / "poisons" / "setup_000.npz") as f:
        assert f["loss"].shape == (2, 1) and f["poisons"].shape == (2, 32, 32, 3)
    assert (workdir / "success.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.realdata
def test_two_processes_craft_and_train_the_one_process_rows(smoke_run, tmp_path):
    # Crafting is one shard_map over every process's devices: its poisons and
    # losses must be gathered from both processes (`to_host`).
    args, whole = smoke_run
    run_cli_processes(args, tmp_path / "run")
    assert_same_rows(tmp_path / "run", whole)


@pytest.mark.slow
@pytest.mark.realdata
def test_sigkill_after_crafting_resumes_without_crafting_again(smoke_run, tmp_path):
    args, whole = smoke_run
    workdir = tmp_path / "killed"
    kill_when(args, workdir, file_exists("poisons/setup_001.npz"))
    assert not (workdir / "results.jsonl").exists()
    saved = workdir / "poisons" / "setup_000.npz"
    before = saved.stat().st_mtime_ns
    proc = run_cli(args, workdir)
    assert "craft step" not in proc.stdout  # loaded, not crafted again
    assert saved.stat().st_mtime_ns == before
    resumed = (workdir / "results.jsonl").read_bytes()
    assert resumed == (whole / "results.jsonl").read_bytes()
