"""Unrolled training: equals `train`, hypergradient = finite differences, ensembles.

A tiny smooth convnet (two convolutions through the library's custom-VJP
convolution, tanh, mean pool, linear head) keeps these fast; the ResNet-20 check of
the same hypergradient is marked slow.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpoison.attacks import unroll as U
from jaxpoison.models import Model
from jaxpoison.models.conv import conv_general_dilated, stock_convolutions
from jaxpoison.victims import TrainConfig, make_train_data, poisoned_batch, train
from jaxpoison.victims.train import make_optimizer, make_trainer

SIZE, CLASSES = 8, 3


def _conv(x, w, stride):
    return conv_general_dilated(
        x,
        w,
        (stride, stride),
        ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def tiny_model(channels: int = 4) -> Model:
    """A Model of pure functions: conv(3->c) tanh conv(c->c, stride 2) tanh pool dense.

    Smooth (tanh, no ReLU kinks), so central differences of an unrolled loss are
    accurate; the strided convolution exercises the custom VJP's dilated path.
    """

    def init(key):
        k1, k2, k3 = jax.random.split(key, 3)
        return {
            "params": {
                "backbone": {
                    "conv1": {
                        "kernel": 0.4 * jax.random.normal(k1, (3, 3, 3, channels))
                    },
                    "conv2": {
                        "kernel": 0.4
                        * jax.random.normal(k2, (3, 3, channels, channels))
                    },
                },
                "head": {
                    "linear": {
                        "kernel": 0.5 * jax.random.normal(k3, (channels, CLASSES)),
                        "bias": jnp.zeros(CLASSES),
                    }
                },
            }
        }

    def head(hp, f):
        return f @ hp["linear"]["kernel"] + hp["linear"]["bias"][None]

    def apply(variables, images, train=False):
        del train
        p = variables["params"]["backbone"]
        h = jnp.tanh(_conv(images - 0.5, p["conv1"]["kernel"].astype(images.dtype), 1))
        h = jnp.tanh(_conv(h, p["conv2"]["kernel"].astype(images.dtype), 2))
        f = h.mean(axis=(1, 2))
        return head(variables["params"]["head"], f), f

    def apply_train(variables, images):
        return apply(variables, images), {}

    def apply_head(head_vars, f, train=False):
        logits = head(head_vars["params"], f)
        return (logits, {}) if train else logits

    return Model(init, apply, apply_train, apply_head, "tiny", (SIZE, SIZE, 3), CLASSES)


def tiny_data(n: int = 24, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, SIZE, SIZE, 3)).astype(np.uint8)
    return images, (np.arange(n) % CLASSES).astype(np.int32)


def assert_trees_close(a, b, **kw):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **kw), a, b)


CONFIG = TrainConfig(
    mode="end_to_end",
    optimizer="sgd",
    learning_rate=0.1,
    momentum=0.9,
    weight_decay=5e-4,
    batch_size=8,
    epochs=2,
    max_steps=4,
    loop="scan",
)


def test_unrolled_training_equals_train_for_the_same_steps(loop="scan"):
    """Same batches (the trainer's permutation, poisons swapped in), same optax
    optimiser: the unroll reproduces `train` with max_steps, across an epoch edge."""
    model = tiny_model()
    variables = model.init(jax.random.key(0))
    images, labels = tiny_data()
    rows = np.array([2, 5, 17], np.int32)
    poisons = np.random.default_rng(1).uniform(size=(3, SIZE, SIZE, 3)).astype("f4")
    data = make_train_data(images, labels, poisons, rows, np.array([0, 1, 2]))
    key = jax.random.key(3)
    trained, _ = train(model, variables, data, key, CONFIG)

    trainer = make_trainer(model, CONFIG, len(labels))
    loop_key = jax.random.split(key)[1]  # as `make_trainer`'s init splits it
    idx, weights = zip(*(trainer.batches(loop_key, e) for e in range(2)), strict=True)
    idx, weights = jnp.concatenate(idx)[:4], jnp.concatenate(weights)[:4]
    tx = make_optimizer(CONFIG, trainer.steps_per_epoch)
    jdata = jax.tree.map(jnp.asarray, data)

    def make_batch(xs):
        x, y, _, _, _ = poisoned_batch(jdata, xs[0])
        return U.Batch(x, y, xs[1])

    learner, out = U.unroll(
        U.make_step(U.end_to_end_apply(model), tx),
        U.init_learner(variables["params"], {}, tx),
        (idx, weights),
        make_batch,
        loop=loop,
    )
    assert out["loss"].shape == (4,)
    assert_trees_close(learner.params, trained["params"], rtol=1e-5, atol=1e-6)


def _hyper_loss(model, variables, images, labels, loop, remat, k=3):
    """Target cross-entropy after k SGD steps on batches holding the poisons."""
    tx = optax.sgd(0.5, momentum=0.9)
    step = U.make_step(U.end_to_end_apply(model), tx)
    target = jnp.asarray(images[:1], jnp.float64) / 255.0
    x = jnp.asarray(images[1 : 1 + k * 6], jnp.float64).reshape(k, 6, SIZE, SIZE, 3)
    y = jnp.asarray(labels[1 : 1 + k * 6]).reshape(k, 6)

    def loss(poisons):
        def make_batch(xs):
            fx, fy = xs
            return U.Batch(
                jnp.concatenate([poisons, fx / 255.0]),
                jnp.concatenate([jnp.array([1, 1]), fy]),
                jnp.ones(8),
            )

        learner, _ = U.unroll(
            step,
            U.init_learner(variables["params"], {}, tx),
            (x, y),
            make_batch,
            loop=loop,
            remat=remat,
        )
        logits = model.apply({"params": learner.params}, target)[0]
        return optax.softmax_cross_entropy_with_integer_labels(
            logits, jnp.array([1])
        ).sum()

    return jax.jit(loss)


def test_hypergradient_through_unroll_matches_central_differences(
    loop="scan", remat=True
):
    """Second order through the custom-VJP convolutions, float64."""
    model = tiny_model()
    images, labels = tiny_data()
    with jax.enable_x64(True):
        variables = jax.tree.map(
            lambda a: jnp.asarray(a, jnp.float64), model.init(jax.random.key(1))
        )
        f = _hyper_loss(model, variables, images, labels, loop, remat)
        rng = np.random.default_rng(0)
        poisons = jnp.asarray(rng.uniform(0.2, 0.8, (2, SIZE, SIZE, 3)))
        direction = jnp.asarray(rng.normal(size=poisons.shape))
        analytic = float(jnp.vdot(jax.grad(f)(poisons), direction))
        eps = 1e-4
        fd = float(f(poisons + eps * direction) - f(poisons - eps * direction)) / (
            2 * eps
        )
    assert abs(analytic) > 1e-3
    np.testing.assert_allclose(analytic, fd, rtol=1e-6)


def test_grad_of_grad_through_custom_conv_equals_lax():
    """The custom VJP's backward pass is itself differentiable: second derivatives
    equal those of JAX's own convolution."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 7, 7, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)

    def second(x):
        g = jax.grad(lambda w: jnp.sum(jnp.tanh(_conv(x, w, 2)) ** 2))(w)
        return jnp.sum(jnp.sin(_conv(x, w - 0.1 * g, 2)))

    ours = jax.grad(second)(x)
    with stock_convolutions():
        stock = jax.grad(second)(x)
    np.testing.assert_allclose(ours, stock, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("how", ["vmap", pytest.param("map", marks=pytest.mark.slow)])
def test_ensemble_equals_separate_surrogates(how):
    """Hypergradients of 3 surrogates vmapped (or lax.mapped) = 3 separate calls;
    the unroll traced as a Python loop (the scan is checked above)."""
    model = tiny_model()
    images, labels = tiny_data()
    tx = optax.sgd(0.3)
    step = U.make_step(U.end_to_end_apply(model), tx)
    x = jnp.asarray(images[:12], jnp.float32).reshape(2, 6, SIZE, SIZE, 3) / 255
    y = jnp.asarray(labels[:12]).reshape(2, 6)
    target = jnp.asarray(images[12:13], jnp.float32) / 255

    def hypergrad(params, poisons):
        def loss(p):
            def make_batch(xs):
                return U.Batch(
                    jnp.concatenate([p, xs[0]]),
                    jnp.concatenate([jnp.array([0]), xs[1]]),
                    jnp.ones(7),
                )

            learner, _ = U.unroll(
                step, U.init_learner(params, {}, tx), (x, y), make_batch, loop="python"
            )
            return model.apply({"params": learner.params}, target)[0][0, 2]

        return jax.grad(loss)(poisons)

    members = [model.init(jax.random.key(i))["params"] for i in range(3)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *members)
    poisons = jnp.full((1, SIZE, SIZE, 3), 0.5, jnp.float32)
    batched = jax.jit(U.ensemble(hypergrad, how, in_axes=(0, None)))(stacked, poisons)
    for i, params in enumerate(members):
        np.testing.assert_allclose(
            batched[i], jax.jit(hypergrad)(params, poisons), rtol=1e-5, atol=1e-7
        )
    assert float(jnp.abs(batched[0] - batched[1]).max()) > 1e-6


@pytest.mark.slow
def test_resnet20_hypergradient_matches_central_differences():
    """The same check on the shipped ResNet-20 (BatchNorm in train mode), 2 steps."""
    from jaxpoison.data import load_cifar10_sample
    from jaxpoison.models import load_pretrained, shipped_weights

    model, variables = load_pretrained("resnet20", shipped_weights("resnet20"))
    data = load_cifar10_sample("train")
    with jax.enable_x64(True):
        v64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
        tx = optax.sgd(0.001)
        step = U.make_step(U.end_to_end_apply(model), tx)
        x = jnp.asarray(data.images[:16], jnp.float64).reshape(2, 8, 32, 32, 3) / 255
        y = jnp.asarray(data.labels[:16]).reshape(2, 8)
        target = jnp.asarray(data.images[20:21], jnp.float64) / 255

        def f(p):
            def make_batch(xs):
                return U.Batch(
                    jnp.concatenate([p, xs[0]]),
                    jnp.concatenate([jnp.array([3]), xs[1]]),
                    jnp.ones(9),
                )

            learner, _ = U.unroll(
                step,
                U.init_learner(v64["params"], v64["batch_stats"], tx),
                (x, y),
                make_batch,
                loop="python",
            )
            variables = {"params": learner.params, "batch_stats": learner.batch_stats}
            return model.apply(variables, target)[0][0, 3]

        f = jax.jit(f)
        rng = np.random.default_rng(0)
        p = jnp.asarray(rng.uniform(0.2, 0.8, (1, 32, 32, 3)))
        d = jnp.asarray(rng.normal(size=p.shape))
        analytic = float(jnp.vdot(jax.grad(f)(p), d))
        # SGD steps use ReLU'(z), a step function of the poison: a difference that
        # straddles a pre-activation's zero sees a jump, so keep it very narrow.
        fd = float(f(p + 1e-8 * d) - f(p - 1e-8 * d)) / 2e-8
    np.testing.assert_allclose(analytic, fd, rtol=1e-4)


def test_unroll_rejects_unknown_loop():
    with pytest.raises(ValueError, match="loop"):
        U.unroll(lambda c, b: (c, 0.0), None, jnp.zeros((1,)), loop="while")
    assert dataclasses.is_dataclass(CONFIG)
