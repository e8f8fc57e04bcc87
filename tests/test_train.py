"""Victim training: vmap equals a loop, swap-in equals a modified copy, gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpoison import UserInputError
from jaxpoison.data import load_cifar10_sample
from jaxpoison.models import (
    Model,
    head_variables,
    load_pretrained,
    shipped_weights,
)
from jaxpoison.victims import (
    TrainConfig,
    evaluate,
    make_train_data,
    poisoned_batch,
    train,
    train_vmapped,
)
from jaxpoison.victims.train import class_logits, weighted_loss


@pytest.fixture(scope="module")
def pretrained():
    return load_pretrained("resnet20", shipped_weights("resnet20"))


@pytest.fixture(scope="module")
def small():
    """60 real CIFAR-10 training images (6 per class) from the shipped sample."""
    data = load_cifar10_sample("train")
    idx = np.concatenate([np.flatnonzero(data.labels == c)[:6] for c in range(10)])
    return data.images[idx], data.labels[idx]


E2E = TrainConfig(
    mode="end_to_end",
    optimizer="sgd",
    learning_rate=0.01,
    momentum=0.9,
    weight_decay=5e-4,
    epochs=1,
    batch_size=16,
    augment=True,
    loop="step",
)
LINEAR = TrainConfig(
    mode="linear",
    cold_start_head=True,
    optimizer="adam",
    learning_rate=0.01,
    epochs=3,
    batch_size=16,
)


# Linear victim on augmented batches: the frozen extractor runs inside every step.
LINEAR_AUG = TrainConfig(
    mode="linear",
    cold_start_head=True,
    optimizer="sgd",
    learning_rate=0.05,
    momentum=0.9,
    epochs=1,
    batch_size=16,
    augment=True,
)


def assert_trees_close(a, b, **kw):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **kw), a, b)


@pytest.mark.slow  # ~40 s; the vmapped-over-trials test below runs by default
def test_vmap_over_3_seeds_equals_3_separate_trainings(pretrained, small):
    """In float64, so that batched and single convolutions' different summation
    orders cannot hide a real difference behind float32 noise amplified by SGD."""
    model, variables = pretrained
    data = make_train_data(*small)
    keys = jax.random.split(jax.random.key(0), 3)
    with jax.enable_x64(True):
        v64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), variables)
        batched, metrics = jax.vmap(lambda k: train(model, v64, data, k, E2E))(keys)
        singles = [train(model, v64, data, keys[i], E2E) for i in range(3)]
    for i, (single, single_metrics) in enumerate(singles):
        assert_trees_close(
            jax.tree.map(lambda x: x[i], batched), single, rtol=1e-9, atol=1e-11
        )
        np.testing.assert_allclose(
            metrics["loss"][i], single_metrics["loss"], rtol=1e-9
        )


def test_seeds_give_different_victims(pretrained, small):
    model, variables = pretrained
    data = make_train_data(*small)
    a, _ = train(model, variables, data, jax.random.key(0), E2E)
    b, _ = train(model, variables, data, jax.random.key(1), E2E)
    diff = jax.tree.map(lambda x, y: float(jnp.abs(x - y).max()), a, b)
    assert max(jax.tree.leaves(diff)) > 1e-4


def _poisons(images, rows, seed=0):
    """Poisons on the 1/255 grid, so the uint8 copy holds exactly the same pixels."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (len(rows), *images.shape[1:])).astype(np.uint8)


def test_swapped_in_poisons_equal_training_on_modified_copy(pretrained, small):
    model, variables = pretrained
    images, labels = small
    rows = np.array([3, 17, 42])
    poisons = _poisons(images, rows)
    new_labels = np.array([1, 2, 3], np.int32)
    swapped = make_train_data(
        images,
        labels,
        poisons.astype(np.float32) / 255.0,
        rows.astype(np.int32),
        new_labels,
    )
    copy_images, copy_labels = images.copy(), labels.copy()
    copy_images[rows], copy_labels[rows] = poisons, new_labels
    explicit = make_train_data(copy_images, copy_labels)
    key = jax.random.key(3)
    a, ma = train(model, variables, swapped, key, E2E)
    b, mb = train(model, variables, explicit, key, E2E)
    # 1e-4 on parameters and losses of order 1: the two programs fuse, and so sum,
    # in different orders, and SGD amplifies float32 rounding (2.4e-6 and 3.5e-6
    # seen on an AVX2 CPU with two threads, 3.1e-5 on one core); a wrong poison row
    # or label moves them far more (checked 2026-12-03 by a scratch run of this test
    # with the copy's row 3 -> 4, or its last label 3 -> 4: the parameters then
    # differ by 287x and 149x this tolerance, the right copy by 0.002x).
    assert_trees_close(a, b, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-5)


def test_unused_poison_slots_change_nothing(pretrained, small):
    model, variables = pretrained
    images, labels = small
    unused = make_train_data(
        images,
        labels,
        np.ones((2, 32, 32, 3), np.float32),
        np.array([-1, -1], np.int32),
        np.zeros(2, np.int32),
    )
    key = jax.random.key(5)
    a, _ = train(model, variables, unused, key, LINEAR)
    b, _ = train(model, variables, make_train_data(images, labels), key, LINEAR)
    assert_trees_close(a, b, rtol=1e-6, atol=1e-7)


def test_poisoned_batch_gathers_clean_and_poisoned_rows(small):
    images, labels = small
    poisons = np.full((2, 32, 32, 3), 0.5, np.float32)
    data = make_train_data(
        images, labels, poisons, np.array([4, 9], np.int32), np.array([7, 8], np.int32)
    )
    x, y, _, hit, _ = poisoned_batch(data, jnp.array([9, 0, 4]))
    np.testing.assert_array_equal(hit, [True, False, True])
    np.testing.assert_array_equal(y, [8, labels[0], 7])
    np.testing.assert_allclose(x[1], images[0] / 255.0, rtol=1e-6)
    assert float(x[0].min()) == float(x[2].max()) == 0.5


@pytest.mark.parametrize("trials", ["vmap", "map"])
def test_train_vmapped_over_trials_equals_one_trial_at_a_time(
    pretrained, small, trials
):
    model, variables = pretrained
    images, labels = small
    rows = np.array([[1, 2], [5, -1], [30, 31]], np.int32)
    poisons = (
        np.random.default_rng(0).uniform(size=(3, 2, 32, 32, 3)).astype(np.float32)
    )
    plabels = np.array([[0, 1], [2, 0], [3, 3]], np.int32)
    keys = jax.random.split(jax.random.key(1), 3)
    data = make_train_data(images, labels, poisons, rows, plabels)
    batched, _ = train_vmapped(model, variables, data, keys, LINEAR_AUG, trials=trials)
    for t in range(3):
        one = make_train_data(images, labels, poisons[t], rows[t], plabels[t])
        single, _ = train(model, variables, one, keys[t], LINEAR_AUG)
        assert_trees_close(
            head_variables(jax.tree.map(lambda x: x[t], batched)),
            head_variables(single),
            rtol=1e-4,
            atol=1e-5,
        )


@pytest.mark.heavy
def test_scan_and_host_loops_agree(pretrained, small):
    model, variables = pretrained
    data = make_train_data(*small)
    config = TrainConfig(**{**E2E.__dict__, "augment": False, "max_steps": 2})
    key = jax.random.key(2)
    a, _ = train(model, variables, data, key, config)
    b, _ = train(
        model, variables, data, key, TrainConfig(**{**config.__dict__, "loop": "scan"})
    )
    assert_trees_close(a, b, rtol=1e-4, atol=1e-5)


def _unrolled_target_loss(model, variables, images, labels, config):
    """Target loss after training on data with two poisons, as a function of them."""
    rows, target = np.array([10, 40], np.int32), jnp.asarray(images[:1]) / 255.0

    def target_loss(poisons):
        data = make_train_data(images, labels, poisons, rows, np.array([3, 3]))
        trained, _ = train(model, variables, data, jax.random.key(0), config)
        logits = model.apply(trained, target.astype(poisons.dtype))[0]
        return optax.softmax_cross_entropy_with_integer_labels(
            logits, jnp.array([3])
        ).sum()

    return jax.jit(target_loss)


def _directional_check(model, variables, small, config, eps):
    images, labels = small
    with jax.enable_x64(True):
        v64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), variables)
        f = _unrolled_target_loss(model, v64, images, labels, config)
        rng = np.random.default_rng(0)
        poisons = jnp.asarray(rng.uniform(0.2, 0.8, (2, 32, 32, 3)))
        direction = jnp.asarray(rng.normal(size=poisons.shape))
        analytic = float(jnp.vdot(jax.grad(f)(poisons), direction))
        fd = float(f(poisons + eps * direction) - f(poisons - eps * direction))
    return analytic, fd / (2 * eps)


@pytest.mark.slow  # ~60 s; test_unroll.py's float64 FD of an unroll runs by default
def test_gradient_through_3_unrolled_steps_matches_finite_differences(
    pretrained, small
):
    """End to end, float64. The unrolled loss is only piecewise smooth: SGD steps use
    ReLU'(z), a step function of the poisons, so wide differences straddle jumps;
    a 1e-6 central difference stays inside one smooth piece."""
    config = TrainConfig(
        mode="end_to_end",
        optimizer="sgd",
        learning_rate=0.001,
        momentum=0.9,
        batch_size=20,
        epochs=1,
        max_steps=3,
        loop="scan",
    )
    analytic, fd = _directional_check(*pretrained, small, config, eps=1e-6)
    assert abs(analytic) > 1e-3
    np.testing.assert_allclose(analytic, fd, rtol=1e-4)


@pytest.mark.slow  # ~50 s; test_unroll.py's float64 FD of an unroll runs by default
def test_gradient_through_unrolled_linear_head_training_matches_fd(pretrained, small):
    """Frozen features are continuous but piecewise linear in the poisons (ReLU), so
    here too the difference is kept narrower than the kinks' spacing."""
    config = TrainConfig(
        mode="linear",
        optimizer="sgd",
        learning_rate=0.1,
        momentum=0.9,
        batch_size=20,
        epochs=1,
        max_steps=3,
        loop="scan",
    )
    analytic, fd = _directional_check(*pretrained, small, config, eps=1e-6)
    assert abs(analytic) > 1e-3
    np.testing.assert_allclose(analytic, fd, rtol=1e-4)


def test_padded_last_batch_loss_is_mean_over_real_examples():
    logits = jnp.array([[2.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    labels = jnp.array([0, 1, 0])
    loss, correct = weighted_loss(logits, labels, None, jnp.array([1.0, 1.0, 0.0]), 0)
    expected = np.mean([np.log1p(np.exp(-2.0)), np.log1p(np.exp(-1.0))])
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert float(correct) == 2.0


def test_linear_mode_trains_only_the_head(pretrained, small):
    model, variables = pretrained
    trained, metrics = train(
        model, variables, make_train_data(*small), jax.random.key(0), LINEAR
    )
    assert_trees_close(
        trained["params"]["backbone"], variables["params"]["backbone"], rtol=0, atol=0
    )
    assert metrics["accuracy"].shape == (3,)
    assert float(metrics["accuracy"][-1]) > 0.5


def test_evaluate_returns_predictions_and_probabilities(pretrained):
    model, variables = pretrained
    test = load_cifar10_sample("test")
    out = evaluate(model, variables, test.images, test.labels, batch_size=128)
    assert out["probabilities"].shape == (300, 10)
    np.testing.assert_allclose(out["probabilities"].sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(
        out["accuracy"], np.mean(np.asarray(out["predictions"]) == test.labels)
    )


def test_label_out_of_range_raises(pretrained, small):
    model, variables = pretrained
    images, labels = small
    with pytest.raises(UserInputError, match="label 10 is out of range"):
        train(
            model,
            variables,
            make_train_data(images, labels + 1),
            jax.random.key(0),
            LINEAR,
        )


def test_unknown_training_option_raises():
    with pytest.raises(UserInputError, match="unknown training option"):
        TrainConfig.from_mapping({"learning_rate": 0.1, "epoch": 3})


def assert_cached_features_train_the_same_victim(model, variables, data, config, key):
    """`config` with and without `cache_augmented_features` train the same head."""
    cached = TrainConfig(**{**config.__dict__, "cache_augmented_features": True})
    a, ma = train(model, variables, data, key, config)
    b, mb = train(model, variables, data, key, cached)
    assert_trees_close(head_variables(a), head_variables(b), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-4)


@pytest.mark.slow  # ~35 s; the cached poison views test below runs by default
def test_cached_augmented_features_train_the_same_victim(pretrained, small):
    """Looking up the features of the drawn crop/flip equals running the extractor
    on the augmented batch (frozen extractor, eval-mode BatchNorm)."""
    model, variables = pretrained
    images, labels = small
    rng = np.random.default_rng(0)
    poisons = rng.uniform(size=(2, 32, 32, 3)).astype(np.float32)
    data = make_train_data(
        images, labels, poisons, np.array([4, 50], np.int32), np.array([1, 1], np.int32)
    )
    config = TrainConfig(**{**LINEAR_AUG.__dict__, "epochs": 2})
    assert_cached_features_train_the_same_victim(
        model, variables, data, config, jax.random.key(7)
    )


@pytest.mark.heavy
def test_cached_poison_views_follow_subset_padding_and_max_steps(pretrained, small):
    """The poison features computed per epoch (only the drawn crop/flips) match the
    extractor on the augmented batch with a subset, a padded last batch (50 rows in
    batches of 16, whose zero-weight padding repeats rows, poisons included), poisons
    outside the subset, and a partial last epoch (max_steps)."""
    model, variables = pretrained
    images, labels = small
    rng = np.random.default_rng(1)
    poisons = rng.uniform(size=(6, 32, 32, 3)).astype(np.float32)
    rows = np.array([0, 2, 4, 30, 48, 58], np.int32)
    data = make_train_data(
        images,
        labels,
        poisons,
        rows,
        labels[rows],
        subset=np.arange(10, 60, dtype=np.int32),
    )
    config = TrainConfig(**{**LINEAR_AUG.__dict__, "epochs": 3, "max_steps": 10})
    assert_cached_features_train_the_same_victim(
        model, variables, data, config, jax.random.key(3)
    )


def test_training_on_a_subset_equals_training_on_the_gathered_rows(pretrained, small):
    model, variables = pretrained
    images, labels = small
    subset = np.arange(0, 60, 2, dtype=np.int32)
    key = jax.random.key(11)
    a, _ = train(
        model, variables, make_train_data(images, labels, subset=subset), key, LINEAR
    )
    b, _ = train(
        model, variables, make_train_data(images[subset], labels[subset]), key, LINEAR
    )
    assert_trees_close(head_variables(a), head_variables(b), rtol=1e-5, atol=1e-6)


def test_batch_larger_than_the_data_is_one_full_batch(pretrained, small):
    """Padding rows carry zero weight: batch 64 on 10 images = batch 10."""
    model, variables = pretrained
    images, labels = small
    data = make_train_data(images[:10], labels[:10])
    key = jax.random.key(4)
    big = TrainConfig(**{**LINEAR.__dict__, "batch_size": 64})
    exact = TrainConfig(**{**LINEAR.__dict__, "batch_size": 10})
    a, _ = train(model, variables, data, key, big)
    b, _ = train(model, variables, data, key, exact)
    assert_trees_close(head_variables(a), head_variables(b), rtol=1e-5, atol=1e-6)


def _two_head_model():
    """Mean-pooled pixels -> class logits and a box, as pure functions: a model whose
    logits are the class head's and whose box head only `all_heads` callers see."""

    def heads(p, f):
        return {"class": f @ p["cls"], "box": f @ p["box"]}

    def select(out, all_heads):
        return out if all_heads else out["class"]

    def apply(variables, images, train=False, all_heads=False):
        del train
        f = images.mean(axis=(1, 2))
        return select(heads(variables["params"]["head"], f), all_heads), f

    def apply_train(variables, images, all_heads=False):
        return apply(variables, images, all_heads=all_heads), {}

    def apply_head(head_vars, f, train=False, all_heads=False):
        out = select(heads(head_vars["params"], f), all_heads)
        return (out, {}) if train else out

    def init(key):
        k1, k2 = jax.random.split(key)
        return {
            "params": {
                "head": {
                    "cls": jax.random.normal(k1, (3, 2)),
                    "box": jax.random.normal(k2, (3, 4)),
                }
            }
        }

    return Model(
        init, apply, apply_train, apply_head, "two_head", (4, 4, 3), 2, ("class", "box")
    )


def test_two_head_training_adds_the_box_loss_and_logits_stay_logits():
    model = _two_head_model()
    variables = model.init(jax.random.key(1))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 4, 4, 3)).astype(np.uint8)
    labels = np.arange(6, dtype=np.int32) % 2
    boxes = rng.uniform(size=(6, 4)).astype(np.float32)
    config = TrainConfig(
        learning_rate=0.5, momentum=0.0, batch_size=6, box_loss_weight=0.3
    )
    data = make_train_data(images, labels, boxes=boxes)
    trained, _ = train(model, variables, data, jax.random.key(0), config)

    def loss(p):  # one full batch: the order of the rows does not matter
        f = images.astype(np.float32).mean(axis=(1, 2)) / 255.0
        ce = optax.softmax_cross_entropy_with_integer_labels(f @ p["cls"], labels)
        l1 = jnp.abs(f @ p["box"] - boxes).sum(-1)
        return jnp.mean(ce + 0.3 * l1)

    head = variables["params"]["head"]
    expected = jax.tree.map(lambda w, g: w - 0.5 * g, head, jax.grad(loss)(head))
    assert_trees_close(trained["params"]["head"], expected, rtol=1e-5, atol=1e-6)
    assert model.apply(trained, images / 255.0)[0].shape == (6, 2)
    assert evaluate(model, trained, images, labels)["probabilities"].shape == (6, 2)
    assert class_logits(jnp.ones(2)).shape == (2,)  # identity on logits
