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
    model, variables = resnet
    sample = load_cifar10_sample("train")
    bases = jnp.asarray(sample.images[:4], jnp.float32) / 255.0
    target = jnp.broadcast_to(
        jnp.asarray(sample.images[100], jnp.float32) / 255.0, bases.shape
    )
    config = fc.FCConfig(iterations=30, step_size=0.01, step_rule="benchmark")
    tf = fc.target_features(model, variables, target)
    before = jnp.linalg.norm(fc.target_features(model, variables, bases) - tf, axis=1)
    poisons, state = fc.craft(model, variables, bases, target, config)
    after = jnp.linalg.norm(fc.target_features(model, variables, poisons) - tf, axis=1)
    assert bool(jnp.all(after < 0.8 * before))
    assert float(jnp.abs(poisons - bases).max()) <= 8 / 255 + 1e-6


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
