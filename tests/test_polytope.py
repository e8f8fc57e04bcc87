"""Convex / Bullseye Polytope crafting: the simplex pieces against brute force, and
the crafter on linear and tiny nonlinear feature maps of 4x4 images."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpoison import UserInputError
from jaxpoison.attacks import polytope as pt


def bisection_projection(v: np.ndarray) -> np.ndarray:
    """Simplex projection by bisection on theta in sum(max(v - theta, 0)) = 1
    (float64): the KKT condition solved numerically, no sorting."""
    lo, hi = v.min() - 1.0, v.max()
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if np.maximum(v - mid, 0).sum() > 1.0 else (lo, mid)
    return np.maximum(v - 0.5 * (lo + hi), 0.0)


def brute_force_simplex_lsq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin_{c in simplex} ||a c - b||^2 by enumerating supports (float64): on
    each support S the equality-constrained least squares has a closed form (KKT
    system); keep the best that is nonnegative."""
    k = a.shape[1]
    best, best_value = None, np.inf
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            s = list(support)
            gram = a[:, s].T @ a[:, s]
            kkt = np.block([[2 * gram, np.ones((size, 1))], [np.ones((1, size)), 0]])
            rhs = np.concatenate([2 * a[:, s].T @ b, [1.0]])
            sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:size]
            if sol.min() < -1e-12:
                continue
            c = np.zeros(k)
            c[s] = sol
            value = np.sum((a @ c - b) ** 2)
            if value < best_value - 1e-15:
                best, best_value = c, value
    return best


def linear_features(dim: int = 6, seed: int = 0):
    """f(x) = W vec(x) on (k, 4, 4, 3) images."""
    w = jnp.asarray(
        np.random.default_rng(seed).normal(size=(48, dim)) / 7.0, jnp.float32
    )
    return lambda x: x.reshape(x.shape[0], -1) @ w


def tanh_features(dim: int = 6, seed: int = 0):
    """A small nonlinear map, so crafting is not a quadratic."""
    lin = linear_features(dim, seed)
    return lambda x: jnp.tanh(lin(x))


def images(k: int, seed: int, low=0.2, high=0.8) -> jax.Array:
    return jnp.asarray(
        np.random.default_rng(seed).uniform(low, high, (k, 4, 4, 3)), jnp.float32
    )


def test_simplex_projection_matches_bisection_reference():
    rng = np.random.default_rng(0)
    cases = [rng.normal(size=7) * s for s in (0.1, 1.0, 5.0)]
    cases += [np.array([0.2, 0.3, 0.5]), np.array([-1.0, -2.0, -0.5])]
    project = jax.jit(pt.project_simplex)
    for v in cases:
        got = np.asarray(project(jnp.asarray(v, jnp.float32)))
        np.testing.assert_allclose(got, bisection_projection(v), atol=2e-6)
        assert got.min() >= 0 and got.sum() == pytest.approx(1.0, abs=1e-6)


def test_coefficient_solve_matches_brute_force_outside_the_hull():
    """A target outside the hull: the optimum sits on a face of the simplex."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 4)), rng.normal(size=6) * 3
    c, _ = pt.simplex_least_squares(
        jnp.asarray(a, jnp.float32),
        jnp.asarray(b, jnp.float32),
        jnp.full((4,), 0.25),
        tol=1e-9,
    )
    reference = brute_force_simplex_lsq(a, b)
    assert (reference == 0).any()  # the test means a face, not the interior
    np.testing.assert_allclose(np.asarray(c), reference, atol=1e-4)


@pytest.mark.parametrize("weights", [[0.1, 0.2, 0.3, 0.4], [0.6, 0.4, 0.0, 0.0]])
def test_cp_objective_recovers_known_convex_weights_on_a_linear_map(weights):
    """Target = a convex combination of the poisons: with f linear, f(t) lies in
    the poisons' feature hull at `weights`, and the solve inside the CP objective
    finds them (the features have full column rank, so the minimiser is unique)
    with zero loss."""
    f = linear_features()
    poisons = images(4, seed=2)
    w = jnp.asarray(weights, jnp.float32)
    target = jnp.tensordot(w, poisons, axes=1)
    config = pt.PolytopeConfig(method="cp", coefficient_tol=1e-9)
    feats = pt.target_features([f], target)
    loss, (coefficients, steps) = pt.objective([f], config, feats)(
        poisons, jnp.full((1, 4), 0.25)
    )
    np.testing.assert_allclose(np.asarray(coefficients[0]), weights, atol=1e-4)
    assert float(loss) < 1e-8 and int(steps) > 1


def test_first_step_moves_each_pixel_by_lr_times_the_channel_std():
    """Adam's first bias-corrected step is lr * sign(g) in the normalised
    coordinates: lr * std_c * sign(g) in pixels (the benchmark's crafting)."""
    f = tanh_features()
    bases, target = images(3, seed=3), images(1, seed=4)[0]
    config = pt.PolytopeConfig(method="bp", step_size=0.01, epsilon=1.0)
    feats = pt.target_features([f], target)
    grad = jax.jit(jax.grad(lambda x: pt.bp_loss(f(x), feats[0])))(bases)
    step = jax.jit(pt.make_step([f], config))
    state = step(pt.init(bases, feats, config), bases, feats)
    std = jnp.asarray(config.step_std).reshape(1, 1, 1, 3)
    expected = -0.01 * std * jnp.sign(grad)
    np.testing.assert_allclose(state.x - bases, expected, atol=1e-5)


@pytest.mark.parametrize("method", ["cp", "bp"])
def test_crafting_lowers_the_objective_inside_the_eps_ball(method):
    f = tanh_features()
    bases, target = images(5, 5, 0.0, 1.0), images(1, seed=6)[0]
    config = pt.PolytopeConfig(method=method, iterations=40, epsilon=16 / 255)
    feats = pt.target_features([f], target)
    poisons, state = jax.jit(lambda b, t: pt.craft([f], b, t, config))(bases, target)
    start, final = jax.jit(jax.vmap(pt.objective([f], config, feats), (0, None)))(
        jnp.stack([bases, poisons]), state.coefficients
    )[0]
    assert float(final) < 0.7 * float(start)
    assert float(jnp.abs(poisons - bases).max()) <= 16 / 255 + 1e-6
    assert float(jnp.abs(poisons - bases).max()) > 15 / 255  # the ball is used
    assert 0.0 <= float(poisons.min()) and float(poisons.max()) <= 1.0
    assert int(state.iteration) == 40


def numpy_reference(method, w, bases, target, config, steps):
    """The benchmark's crafting loop written independently in float64 numpy, for a
    linear feature map f(x) = W^T vec(x) (gradients in closed form): Adam by hand
    on z = (x - mean) / std, then the eps-ball and [0, 1] clip in pixels."""
    k = len(bases)
    std = np.asarray(config.step_std)
    ft = target.reshape(-1) @ w
    x = bases.copy()
    m, v = np.zeros_like(x), np.zeros_like(x)
    b1, b2 = config.momentum, config.beta2
    for t in range(1, steps + 1):
        feats = x.reshape(k, -1) @ w
        if method == "bp":
            r = feats.mean(0) - ft
            g_feats = np.tile(r / np.linalg.norm(r) / k, (k, 1)) / np.linalg.norm(ft)
        else:
            c = brute_force_simplex_lsq(feats.T, ft)
            r = ft - c @ feats
            g_feats = -np.outer(c, r) / np.sum(ft**2)
        grad = (g_feats @ w.T).reshape(x.shape) * std  # d/dz
        m = b1 * m + (1 - b1) * grad
        v = b2 * v + (1 - b2) * grad**2
        dz = (
            -config.step_size
            * (m / (1 - b1**t))
            / (np.sqrt(v / (1 - b2**t)) + config.adam_eps)
        )
        x = x + dz * std
        x = np.clip(bases + np.clip(x - bases, -config.epsilon, config.epsilon), 0, 1)
    return x


@pytest.mark.parametrize("method", ["cp", "bp"])
def test_crafting_matches_an_independent_numpy_loop(method):
    rng = np.random.default_rng(13)
    w = rng.normal(size=(48, 6)) / 7.0
    bases = rng.uniform(0.1, 0.9, (4, 4, 4, 3))
    target = rng.uniform(0.1, 0.9, (4, 4, 3))
    config = pt.PolytopeConfig(
        method=method, iterations=4, epsilon=1.0, coefficient_tol=1e-9
    )
    w32 = jnp.asarray(w, jnp.float32)
    f = lambda x: x.reshape(x.shape[0], -1) @ w32  # noqa: E731
    ours = jax.jit(lambda b, t: pt.craft([f], b, t, config)[0])(
        jnp.asarray(bases, jnp.float32), jnp.asarray(target, jnp.float32)
    )
    reference = numpy_reference(method, w, bases, target, config, 4)
    np.testing.assert_allclose(np.asarray(ours), reference, atol=1e-4)
    moved = np.abs(reference - bases)
    # The ball does not bind (epsilon 1): positions are set by the Adam steps alone
    # (the ball's clip is tested above), about lr * std = 2/255 per step.
    assert ((moved > 1 / 255) & (moved < 9 / 255)).mean() > 0.5


def test_vmapped_problems_match_one_by_one():
    f = tanh_features()
    bases = jnp.stack([images(3, seed=7), images(3, seed=8)])
    targets = jnp.stack([images(1, seed=9)[0], images(1, seed=10)[0]])
    config = pt.PolytopeConfig(method="cp", iterations=5)
    one = jax.jit(lambda b, t: pt.craft([f], b, t, config)[0])
    batched = jax.jit(jax.vmap(one))(bases, targets)
    for i in range(2):
        np.testing.assert_allclose(batched[i], one(bases[i], targets[i]), atol=1e-6)


def test_ensemble_objective_is_the_members_mean():
    f, g = tanh_features(seed=0), tanh_features(seed=1)
    x, target = images(3, seed=11), images(1, seed=12)[0]
    config = pt.PolytopeConfig(method="bp")
    both = pt.objective([f, g], config, pt.target_features([f, g], target))
    alone = [pt.objective([h], config, pt.target_features([h], target)) for h in (f, g)]
    c = jnp.full((1, 3), 1 / 3)
    expected = 0.5 * (alone[0](x, c)[0] + alone[1](x, c)[0])
    np.testing.assert_allclose(both(x, jnp.full((2, 3), 1 / 3))[0], expected, 1e-6)


def test_bad_settings_are_user_errors():
    with pytest.raises(UserInputError, match="unknown polytope method"):
        pt.PolytopeConfig(method="fc")
    with pytest.raises(UserInputError, match="step_std"):
        pt.init(jnp.zeros((2, 4, 4, 1)) + 0.5, (jnp.ones(3),), pt.PolytopeConfig())
