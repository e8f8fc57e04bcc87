"""Truong et al.'s regularisers against looped numpy versions, closed forms and the
trainer's gradient; zero-weight padding rows never count."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpoison.data import load_cifar10_sample
from jaxpoison.models.base import Classifier, LinearHead, from_flax
from jaxpoison.victims import TrainConfig, make_train_data, train
from jaxpoison.victims import regularizers as reg
from jaxpoison.victims.train import make_trainer


def _batch(seed=0, b=7, d=4, classes=3):
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(b, d)).astype(np.float32)
    y = rng.integers(0, classes, b).astype(np.int32)
    return f, y


def np_contrastive(f, y, margin, n=None):
    """Eq. 4-5 as printed (n classes) or, with n=None, Hadsell's squared form."""
    total, pairs = 0.0, 0
    for i in range(len(f)):
        for j in range(len(f)):
            if i == j:
                continue
            d = np.linalg.norm(f[i] - f[j])
            if n is None:
                total += d**2 if y[i] == y[j] else max(0.0, margin - d) ** 2
            else:
                total += d / n if y[i] == y[j] else (n - 1) / n * max(0.0, margin - d)
            pairs += 1
    return total / pairs


def np_snn(f, y, t):
    terms = []
    for i in range(len(f)):
        num = sum(
            np.exp(-np.sum((f[i] - f[j]) ** 2) / t)
            for j in range(len(f))
            if j != i and y[j] == y[i]
        )
        den = sum(
            np.exp(-np.sum((f[i] - f[k]) ** 2) / t) for k in range(len(f)) if k != i
        )
        if num > 0:
            terms.append(-np.log(num / den))
    return np.mean(terms)


def test_logit_squeezing_value_and_gradient_exclude_padding():
    z, _ = _batch(b=6, d=5)
    w = np.array([1, 1, 1, 1, 0, 0], np.float32)
    expected = np.mean(np.linalg.norm(z[:4], axis=1))
    np.testing.assert_allclose(reg.logit_squeezing(z, w), expected, rtol=1e-6)
    # d/dz_i mean_i ||z_i|| = z_i / (n ||z_i||) for real rows, 0 for padding.
    grad = jax.grad(reg.logit_squeezing)(jnp.asarray(z), jnp.asarray(w))
    want = z / (4 * np.linalg.norm(z, axis=1, keepdims=True)) * w[:, None]
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)
    # All-zero logits: zero, with a finite gradient.
    g0 = jax.grad(reg.logit_squeezing)(jnp.zeros((3, 2)), jnp.ones(3))
    assert np.all(np.isfinite(g0))


def test_contrastive_losses_match_a_pair_loop():
    f, y = _batch(1)
    w = np.ones(len(f), np.float32)
    for margin in (0.5, 3.0):
        np.testing.assert_allclose(
            reg.contrastive_loss(f, y, w, margin, 3),
            np_contrastive(f, y, margin, n=3),
            rtol=1e-5,
        )
        np.testing.assert_allclose(
            reg.hadsell_contrastive_loss(f, y, w, margin),
            np_contrastive(f, y, margin),
            rtol=1e-5,
        )


def test_contrastive_loss_is_eq_4_5_as_printed_on_a_hand_worked_example():
    """Three points, 0 = (0, 0), 1 = (3, 4), 2 = (6, 8), labels 0, 0, 1, margin
    c = 7. Distances: d01 = 5, d02 = 10, d12 = 5. By hand, with n = 10 classes:
    Eq. 4, pair (0, 1): 5 / 10 = 0.5; Eq. 5, pair (0, 2): 0.9 max(0, 7 - 10) = 0;
    pair (1, 2): 0.9 max(0, 7 - 5) = 1.8. The mean over the 3 pairs (each counted
    in both orders) is 2.3 / 3. With n = 5: (5/5 + 0 + 0.8 * 2) / 3 = 2.6 / 3.
    Squared (Hadsell): (25 + 0 + 2^2) / 3 = 29 / 3."""
    f = np.array([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]], np.float32)
    y = np.array([0, 0, 1])
    w = np.ones(3, np.float32)
    np.testing.assert_allclose(reg.contrastive_loss(f, y, w, 7.0, 10), 2.3 / 3)
    np.testing.assert_allclose(reg.contrastive_loss(f, y, w, 7.0, 5), 2.6 / 3)
    np.testing.assert_allclose(reg.hadsell_contrastive_loss(f, y, w, 7.0), 29 / 3)
    # Gradient at point 1, by hand: (1/3) [(1/10) (f1 - f0)/d01 - 0.9 (f1 - f2)/d12]
    # = (1/3) [(0.06, 0.08) + (0.54, 0.72)] = (0.2, 0.8 / 3); point 0 only feels
    # the pull of Eq. 4: -(1/3)(1/10)(0.6, 0.8) = (-0.02, -0.08 / 3).
    grad = jax.grad(reg.contrastive_loss)(jnp.asarray(f), y, w, 7.0, 10)
    np.testing.assert_allclose(grad[1], [0.2, 0.8 / 3], rtol=1e-5)
    np.testing.assert_allclose(grad[0], [-0.02, -0.08 / 3], rtol=1e-5)


def test_hadsell_contrastive_loss_closed_form_on_two_points():
    f = np.array([[0.0, 0.0], [3.0, 4.0]], np.float32)  # distance 5
    w = np.ones(2, np.float32)
    same, other = np.array([1, 1]), np.array([0, 1])
    np.testing.assert_allclose(reg.hadsell_contrastive_loss(f, same, w, 1.0), 25.0)
    np.testing.assert_allclose(reg.hadsell_contrastive_loss(f, other, w, 7.0), 4.0)
    np.testing.assert_allclose(reg.hadsell_contrastive_loss(f, other, w, 2.0), 0.0)


def test_snn_loss_matches_a_loop_and_a_closed_form():
    f, y = _batch(2)
    for t in (0.5, 4.0):
        np.testing.assert_allclose(
            reg.soft_nearest_neighbor_loss(f, y, np.ones(len(f), np.float32), t),
            np_snn(f, y, t),
            rtol=1e-5,
        )
    # Points 0, 1 (class 0) at distance 1, point 2 (class 1) at distance 2 from 0
    # and sqrt(5) from 1: point 2 has no partner; T = 1.
    f = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], np.float32)
    y = np.array([0, 0, 1])
    e = np.exp
    want = (-np.log(e(-1) / (e(-1) + e(-4))) - np.log(e(-1) / (e(-1) + e(-5)))) / 2
    got = reg.soft_nearest_neighbor_loss(f, y, np.ones(3, np.float32), 1.0)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_snn_loss_small_temperature_is_finite():
    f, y = _batch(3)
    w = np.ones(len(f), np.float32)
    value, grad = jax.value_and_grad(reg.soft_nearest_neighbor_loss)(
        jnp.asarray(f), y, w, 1e-3
    )
    assert np.isfinite(value) and np.all(np.isfinite(grad))


@pytest.mark.parametrize(
    "fn",
    [
        lambda f, y, w: reg.contrastive_loss(f, y, w, 2.0, 3),
        lambda f, y, w: reg.hadsell_contrastive_loss(f, y, w, 2.0),
        lambda f, y, w: reg.soft_nearest_neighbor_loss(f, y, w, 1.0),
        lambda f, y, w: reg.logit_squeezing(f, w),
    ],
)
def test_padding_rows_do_not_count_as_examples_or_partners(fn):
    """The trainer pads with repeats of real rows (distance 0 to them) at weight 0:
    the value equals the value on the real rows alone, the gradient is finite and
    zero on the padding rows."""
    fn = jax.jit(fn)  # eager, the four losses took 30 s
    f, y = _batch(4, b=5)
    pad_f = np.concatenate([f, f[:3]])
    pad_y = np.concatenate([y, (y[:3] + 1) % 3])  # other labels, too
    w = np.array([1] * 5 + [0] * 3, np.float32)
    np.testing.assert_allclose(
        fn(pad_f, pad_y, w), fn(f, y, np.ones(5, np.float32)), rtol=1e-5
    )
    grad = jax.grad(fn)(jnp.asarray(pad_f), pad_y, w)
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad[5:], 0.0)
    np.testing.assert_allclose(
        grad[:5], jax.grad(fn)(jnp.asarray(f), y, np.ones(5, np.float32)), rtol=1e-5
    )


def test_mixup_partners_permute_real_rows_among_themselves():
    w = jnp.array([1, 1, 1, 1, 1, 0, 0, 0], jnp.float32)
    counts = np.zeros((5, 5))
    for s in range(400):
        perm = np.asarray(reg.mixup_partners(jax.random.key(s), w))
        assert sorted(perm) == list(range(8))
        assert set(perm[:5]) == set(range(5)) and set(perm[5:]) == {5, 6, 7}
        counts[np.arange(5), perm[:5]] += 1
    # Uniform over the real rows: each partner ~80 of 400 times.
    assert counts.min() > 45 and counts.max() < 120


def test_manifold_mixup_loss_matches_a_loop_with_its_lambda_and_partners():
    f, y = _batch(5, b=6, d=3)
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(3, 3)).astype(np.float32)
    w = np.array([1, 1, 1, 1, 0, 0], np.float32)
    key = jax.random.key(7)

    def head(x):
        return x @ kernel, {}

    loss, _ = reg.manifold_mixup_loss(head, f, y, w, key)
    k_lam, k_perm = jax.random.split(key)
    lam = float(jax.random.uniform(k_lam, ()))
    perm = np.asarray(reg.mixup_partners(k_perm, jnp.asarray(w)))
    terms = []
    for i in range(4):
        z = (lam * f[i] + (1 - lam) * f[perm[i]]) @ kernel
        logp = z - np.log(np.sum(np.exp(z)))
        terms.append(-lam * logp[y[i]] - (1 - lam) * logp[y[perm[i]]])
    np.testing.assert_allclose(loss, np.mean(terms), rtol=1e-5)
    # lam = 1 everywhere would be the plain cross-entropy: check the U(0,1) draw.
    lams = [
        float(jax.random.uniform(jax.random.split(jax.random.key(s))[0], ()))
        for s in range(200)
    ]
    assert 0.4 < np.mean(lams) < 0.6 and min(lams) >= 0 and max(lams) <= 1


class TinyBackbone(nn.Module):
    """A strided conv, BatchNorm and a dense layer: an end-to-end victim with
    BatchNorm statistics that compiles in a second."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3), strides=(4, 4))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x).reshape(x.shape[0], -1)
        return nn.relu(nn.Dense(16)(x))


@pytest.fixture(scope="module")
def setup():
    module = Classifier(TinyBackbone(), LinearHead(10), (0.5,) * 3, (0.25,) * 3)
    model = from_flax("tiny", module, (32, 32, 3), 10)
    variables = model.init(jax.random.key(0))
    sample = load_cifar10_sample("train")
    rows = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 40])
    return model, variables, make_train_data(sample.images[rows], sample.labels[rows])


TERMS = {
    "logit_squeeze": lambda z, f, y, w: reg.logit_squeezing(z, w),
    # Eq. 4-5 as printed, n = the model's 10 classes.
    "contrastive": lambda z, f, y, w: reg.contrastive_loss(f, y, w, 1.0, 10),
    "snn": lambda z, f, y, w: reg.soft_nearest_neighbor_loss(f, y, w, 1.0),
}


def test_trainer_step_adds_the_terms_over_real_examples_only(setup):
    """One end-to-end SGD step on 10 examples in a batch padded to 16 equals a
    hand-written step: grad of the weighted CE + sum of weight * term, the terms
    over the 10 real rows only (the padding rows do enter BatchNorm statistics, so
    the hand-written forward runs on the same 16 rows)."""
    model, variables, data = setup
    weights = {"logit_squeeze": 0.3, "contrastive": 0.2, "snn": 0.5}
    cfg = TrainConfig(
        mode="end_to_end",
        optimizer="sgd",
        learning_rate=0.5,
        momentum=0.0,
        epochs=1,
        batch_size=16,
        loop="scan",
        **weights,
    )
    key = jax.random.key(0)
    trained, _ = train(model, variables, data, key, cfg)
    trainer = make_trainer(model, cfg, 10)
    state = trainer.init(variables, data, key)
    idx, w = trainer.batches(state.key, 0)
    idx, w = idx[0], w[0]
    assert float(w.sum()) == 10.0 and float(w[10:].sum()) == 0.0
    x = jnp.asarray(data.images)[idx].astype(jnp.float32) / 255.0
    y = jnp.asarray(data.labels)[idx]

    def loss(params, with_terms):
        (z, f), _ = model.apply_train({**variables, "params": params}, x)
        ce = optax.softmax_cross_entropy_with_integer_labels(z, y)
        total = jnp.sum(ce * w) / 10.0
        if with_terms:
            ones = jnp.ones(10, jnp.float32)
            for name, weight in weights.items():
                total += weight * TERMS[name](z[:10], f[:10], y[:10], ones)
        return total

    @functools.partial(jax.jit, static_argnums=0)
    def sgd(with_terms):
        grads = jax.grad(loss)(variables["params"], with_terms)
        return jax.tree.map(lambda p, g: p - 0.5 * g, variables["params"], grads)

    want = sgd(True)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-5),
        trained["params"],
        want,
    )
    # The terms matter: without them the step is measurably different.
    plain = sgd(False)
    diffs = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), want, plain)
    assert max(jax.tree.leaves(diffs)) > 1e-3


def test_training_with_mixup_is_finite_and_differs(setup):
    """End to end, mixup through `apply_head` on the backbone's features."""
    model, variables, data = setup
    cfg = TrainConfig(
        mode="end_to_end",
        learning_rate=0.01,
        epochs=1,
        batch_size=8,  # 10 examples: a padded second batch
        mixup=1.0,
        loop="scan",
    )
    trained, metrics = train(model, variables, data, jax.random.key(1), cfg)
    assert np.all(np.isfinite(metrics["loss"]))
    for leaf in jax.tree.leaves(trained):
        assert np.all(np.isfinite(leaf))
    other, _ = train(
        model,
        variables,
        data,
        jax.random.key(1),
        dataclasses.replace(cfg, mixup=0.0),
    )
    k1 = trained["params"]["head"]["linear"]["kernel"]
    k2 = other["params"]["head"]["linear"]["kernel"]
    assert not np.allclose(k1, k2, atol=1e-7)
