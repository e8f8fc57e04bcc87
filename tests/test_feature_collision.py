"""Feature-collision crafting: closed forms on a linear toy, and on ResNet-20."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpoison import UserInputError
from jaxpoison.attacks import feature_collision as fc
from jaxpoison.data import load_cifar10_sample
from jaxpoison.models import Model, load_pretrained, shipped_weights


def linear_model(features: int = 5, seed: int = 0) -> tuple[Model, dict]:
    """f(x) = W vec(x): the feature objective is a quadratic with a closed form."""
    w = jnp.asarray(np.random.default_rng(seed).normal(size=(2 * 2 * 3, features)))

    def apply(variables, x, train=False):
        feats = x.reshape(x.shape[0], -1) @ variables["w"]
        return feats[:, :2], feats

    return Model(lambda key: {"w": w}, apply, None, None, "linear", (2, 2, 3), 2), {
        "w": w
    }


def test_beta_scales_with_feature_and_input_dims():
    config = fc.FCConfig(beta0=0.25)
    assert fc.prox_beta(config, 64, 3072) == pytest.approx(0.25 * (64 / 3072) ** 2)


def test_proximal_step_minimises_its_objective():
    rng = np.random.default_rng(0)
    x_hat, base = (jnp.asarray(rng.uniform(size=(3, 2, 2, 3))) for _ in range(2))
    lr, beta = jnp.array([0.1, 0.5, 2.0]), 0.7
    x = fc.proximal_step(x_hat, base, lr, beta)

    def objective(z):  # 0.5 ||z - x^||^2 + 0.5 lr beta ||z - b||^2, per poison
        lr_ = lr.reshape(-1, 1, 1, 1)
        return jnp.sum(0.5 * (z - x_hat) ** 2 + 0.5 * lr_ * beta * (z - base) ** 2)

    np.testing.assert_allclose(jax.grad(objective)(x), 0.0, atol=1e-6)


def test_watermark_blends_target_into_base():
    base, target = jnp.zeros((1, 2, 2, 3)), jnp.ones((1, 2, 2, 3))
    np.testing.assert_allclose(fc.watermark(base, target, 0.3), 0.3)


def test_fixed_step_is_gradient_descent_on_the_feature_distance():
    model, variables = linear_model()
    rng = np.random.default_rng(1)
    base = jnp.asarray(rng.uniform(0.3, 0.7, (2, 2, 2, 3)))
    target = jnp.asarray(rng.uniform(0.3, 0.7, (2, 2, 2, 3)))
    config = fc.FCConfig(
        step_size=1e-3,
        step_rule="fixed",
        constraint="linf",
        epsilon=1.0,
        watermark=0.0,
        iterations=5,
    )
    tf = fc.target_features(model, variables, target)
    state = fc.make_step(model, variables, config)(
        fc.init(base, target, config), base, tf
    )
    w = variables["w"]
    # grad of ||W x - W t||^2 is 2 W^T (W x - W t).
    grad = 2 * ((base.reshape(2, -1) - target.reshape(2, -1)) @ w @ w.T)
    np.testing.assert_allclose(
        state.x.reshape(2, -1), base.reshape(2, -1) - 1e-3 * grad, rtol=1e-6
    )


def test_first_gradient_is_taken_at_the_watermarked_start():
    """As craft_poisons_fc.py: x0 = 0.3 t + 0.7 b unprojected, grad at x0, then
    project x0 - lr grad into the ball around b (not the projected x0's gradient)."""
    model, variables = linear_model()
    rng = np.random.default_rng(5)
    base = jnp.asarray(rng.uniform(0.2, 0.8, (2, 2, 2, 3)))
    target = jnp.asarray(rng.uniform(0.2, 0.8, (2, 2, 2, 3)))
    config = fc.FCConfig(step_size=0.05, step_rule="fixed", watermark=0.3)
    state = fc.init(base, target, config)
    np.testing.assert_allclose(state.x, 0.3 * target + 0.7 * base, rtol=1e-6)
    new = fc.make_step(model, variables, config)(
        state, base, fc.target_features(model, variables, target)
    )
    w, eps = np.asarray(variables["w"], np.float64), 8 / 255
    b, t = np.asarray(base, np.float64), np.asarray(target, np.float64)

    def first_step(x0):
        grad = 2 * ((x0 - t).reshape(2, -1) @ w @ w.T).reshape(x0.shape)
        return np.clip(b + np.clip(x0 - 0.05 * grad - b, -eps, eps), 0, 1)

    x0 = 0.3 * t + 0.7 * b
    np.testing.assert_allclose(new.x, first_step(x0), atol=1e-6)
    # The old start (x0 projected first) gives a different poison.
    assert np.abs(first_step(np.clip(x0, b - eps, b + eps)) - new.x).max() > 1e-3


def paper_rule_reference(w, base, target, lr, beta, iterations):
    """The "paper" rule as a plain float64 loop over one poison (vec images):
    prox step; objective ||W x - W t||^2 + beta ||x_new - b||^2; once 40 are
    recorded, lr halves when the objective exceeds the mean of the last 40."""
    x, feats_t, history, rates = base.copy(), target @ w, [], []
    for _ in range(iterations):
        diff = x @ w - feats_t
        x_hat = x - lr * 2 * (w @ diff)
        x_new = np.clip((x_hat + lr * beta * base) / (1 + lr * beta), 0.0, 1.0)
        objective = diff @ diff + beta * np.sum((x_new - base) ** 2)
        if len(history) >= 40 and objective > np.mean(history[-40:]):
            lr = lr / 2
        history.append(objective)
        rates.append(lr)
        x = x_new
    return x, np.array(rates)


def test_paper_rule_over_120_iterations_matches_a_host_loop():
    """Too large a start lr diverges until the 40-objective window is full; the
    rule then halves it until the objective falls again (float64 on both sides)."""
    rng = np.random.default_rng(6)
    base = rng.uniform(0.3, 0.7, (3, 2, 2, 3))
    target = rng.uniform(0.3, 0.7, (3, 2, 2, 3))
    lr, beta, iterations = 0.06, 0.5, 120
    with jax.enable_x64(True):
        model, variables = linear_model()
        config = fc.FCConfig(
            iterations=iterations,
            step_size=lr,
            step_rule="paper",
            constraint="prox",
            beta=beta,
            watermark=0.0,
        )
        poisons, state = fc.craft(
            model, variables, jnp.asarray(base), jnp.asarray(target), config
        )
        w = np.asarray(variables["w"])
    for i in range(3):
        x, rates = paper_rule_reference(
            w, base[i].ravel(), target[i].ravel(), lr, beta, iterations
        )
        np.testing.assert_allclose(np.asarray(poisons[i]).ravel(), x, atol=1e-9)
        np.testing.assert_allclose(float(state.step_size[i]), rates[-1])
        # The window matters: no halving before step 40, some after it.
        assert np.all(rates[:40] == lr) and rates[-1] < lr


def test_linf_poisons_stay_in_the_ball_and_valid_pixels():
    model, variables = linear_model()
    rng = np.random.default_rng(2)
    base = jnp.asarray(rng.uniform(size=(4, 2, 2, 3)))
    target = jnp.asarray(rng.uniform(size=(4, 2, 2, 3)))
    config = fc.FCConfig(
        step_size=10.0, step_rule="fixed", epsilon=8 / 255, watermark=0.3, iterations=20
    )
    poisons, _ = fc.craft(model, variables, base, target, config)
    assert float(jnp.abs(poisons - base).max()) <= 8 / 255 + 1e-7
    assert float(poisons.min()) >= 0.0 and float(poisons.max()) <= 1.0


def test_benchmark_rule_rejects_a_worse_step_and_shrinks_it():
    model, variables = linear_model()
    rng = np.random.default_rng(3)
    base = jnp.asarray(rng.uniform(size=(1, 2, 2, 3)))
    target = jnp.asarray(rng.uniform(size=(1, 2, 2, 3)))
    config = fc.FCConfig(
        step_size=0.01, step_rule="benchmark", epsilon=1.0, watermark=0.0
    )
    state = fc.init(base, target, config)._replace(last_objective=jnp.zeros(1))
    new = fc.make_step(model, variables, config)(
        state, base, fc.target_features(model, variables, target)
    )
    np.testing.assert_array_equal(new.x, state.x)  # rejected: x unchanged
    np.testing.assert_allclose(new.step_size, 0.002)  # lr * 0.2


def test_done_poisons_are_masked():
    model, variables = linear_model()
    rng = np.random.default_rng(4)
    base = jnp.asarray(rng.uniform(size=(2, 2, 2, 3)))
    target = jnp.asarray(rng.uniform(size=(2, 2, 2, 3)))
    config = fc.FCConfig(step_size=0.01, step_rule="fixed", epsilon=1.0)
    state = fc.init(base, target, config)
    state = state._replace(done=jnp.array([True, False]))
    new = fc.make_step(model, variables, config)(
        state, base, fc.target_features(model, variables, target)
    )
    np.testing.assert_array_equal(new.x[0], state.x[0])
    assert int(new.iteration[0]) == 0 and int(new.iteration[1]) == 1
    assert not np.array_equal(new.x[1], state.x[1])


def test_stop_distance_ends_crafting_early():
    model, variables = linear_model()
    base = jnp.full((1, 2, 2, 3), 0.5)
    config = fc.FCConfig(
        step_rule="fixed",
        epsilon=1.0,
        watermark=0.0,
        stop_distance=1e-3,
        iterations=100,
    )
    _, state = fc.craft(model, variables, base, base + 1e-5, config)
    assert int(state.iteration[0]) == 1  # already within the distance


def test_bad_config_raises():
    with pytest.raises(UserInputError, match="unknown step rule"):
        fc.FCConfig(step_rule="adam")


@pytest.fixture(scope="module")
def resnet():
    return load_pretrained("resnet20", shipped_weights("resnet20"))


def test_crafting_brings_resnet_features_closer(resnet):
    """Without a watermark: with one, the benchmark's rule rejects every step after
    the first whenever the projected first step is farther from the target than
    the watermarked start (its objective is compared with the start's), as in
    craft_poisons_fc.py, so some poisons barely move."""
    model, variables = resnet
    sample = load_cifar10_sample("train")
    bases = jnp.asarray(sample.images[:4], jnp.float32) / 255.0
    target = jnp.broadcast_to(
        jnp.asarray(sample.images[100], jnp.float32) / 255.0, bases.shape
    )
    config = fc.FCConfig(
        iterations=30, step_size=0.01, step_rule="benchmark", watermark=0.0
    )
    tf = fc.target_features(model, variables, target)
    before = jnp.linalg.norm(fc.target_features(model, variables, bases) - tf, axis=1)
    poisons, state = fc.craft(model, variables, bases, target, config)
    after = jnp.linalg.norm(fc.target_features(model, variables, poisons) - tf, axis=1)
    assert bool(jnp.all(after < 0.8 * before))
    assert float(jnp.abs(poisons - bases).max()) <= 8 / 255 + 1e-6


@pytest.mark.heavy
def test_batched_crafting_equals_one_base_at_a_time(resnet):
    """A batch of poisons is the peers' per-base loop, run at once."""
    model, variables = resnet
    sample = load_cifar10_sample("train")
    bases = jnp.asarray(sample.images[:3], jnp.float32) / 255.0
    targets = jnp.asarray(sample.images[200:203], jnp.float32) / 255.0
    config = fc.FCConfig(iterations=5, step_size=0.01, step_rule="benchmark")
    batched, _ = fc.craft(model, variables, bases, targets, config)
    for i in range(3):
        single, _ = fc.craft(
            model, variables, bases[i : i + 1], targets[i : i + 1], config
        )
        np.testing.assert_allclose(batched[i], single[0], atol=2e-6)
