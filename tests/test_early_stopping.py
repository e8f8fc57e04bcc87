"""Early stopping: the pure scan equals a host loop that stops; vmap equals a loop."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpoison.data import load_cifar10_sample
from jaxpoison.models.base import Classifier, LinearHead, from_flax
from jaxpoison.victims import TrainConfig, evaluate, loops, make_train_data
from jaxpoison.victims.early_stopping import (
    early_stopping_trials,
    train_early_stopping,
)
from jaxpoison.victims.train import make_trainer


class TinyBackbone(nn.Module):
    """A strided conv, BatchNorm and a dense layer: a real end-to-end victim with
    BatchNorm statistics, small enough to compile in a second."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3), strides=(4, 4))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x).reshape(x.shape[0], -1)
        return nn.relu(nn.Dense(16)(x))


def tiny_model():
    module = Classifier(TinyBackbone(), LinearHead(10), (0.5,) * 3, (0.25,) * 3)
    return from_flax("tiny", module, (32, 32, 3), 10)


# A noisy victim (large SGD steps, 4 steps an epoch), so the validation accuracy
# goes up and down and patience 2 stops it early.
CFG = TrainConfig(
    mode="end_to_end",
    optimizer="sgd",
    learning_rate=0.5,
    momentum=0.9,
    epochs=12,
    batch_size=16,
)
PATIENCE = 2


@pytest.fixture(scope="module")
def setup():
    model = tiny_model()
    variables = model.init(jax.random.key(0))
    sample = load_cifar10_sample("train")
    tr = np.concatenate([np.flatnonzero(sample.labels == c)[:6] for c in range(10)])
    va = np.concatenate([np.flatnonzero(sample.labels == c)[6:9] for c in range(10)])
    data = make_train_data(sample.images[tr], sample.labels[tr])
    val = make_train_data(sample.images[va], sample.labels[va])
    return model, variables, data, val


def host_loop(model, variables, data, val, key):
    """The reference: epoch by epoch from Python, evaluate, keep the best, break."""
    data = jax.tree.map(jnp.asarray, data)
    trainer = make_trainer(model, CFG, data.images.shape[0])
    state = trainer.init(variables, data, key)
    best, best_acc, bad, accs = trainer.finish(state, variables), -np.inf, 0, []
    run_epoch = jax.jit(functools.partial(loops._epoch, trainer))
    accuracy = jax.jit(lambda v: evaluate(model, v, val.images, val.labels)["accuracy"])
    for epoch in range(CFG.epochs):
        state, _ = run_epoch(state, variables, data, epoch)
        trained = trainer.finish(state, variables)
        acc = float(accuracy(trained))
        accs.append(acc)
        if acc > best_acc:
            best, best_acc, bad = trained, acc, 0
        else:
            bad += 1
        if bad >= PATIENCE:
            break
    return best, best_acc, accs


def assert_trees_close(a, b, **kw):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **kw), a, b)


def test_pure_early_stopping_equals_a_host_loop_that_stops(setup):
    model, variables, data, val = setup
    key = jax.random.key(0)
    best, metrics = train_early_stopping(
        model, variables, data, val, key, CFG, patience=PATIENCE
    )
    ref_best, ref_acc, ref_accs = host_loop(model, variables, data, val, key)
    runs = len(ref_accs)
    assert runs < CFG.epochs  # the reference did stop early
    assert int(metrics["epochs_run"]) == runs
    np.testing.assert_allclose(metrics["val_accuracy"][:runs], ref_accs, atol=1e-6)
    np.testing.assert_array_equal(metrics["val_accuracy"][runs:], -1.0)
    np.testing.assert_array_equal(metrics["loss"][runs:], 0.0)
    assert int(metrics["best_epoch"]) == int(np.argmax(ref_accs))
    np.testing.assert_allclose(metrics["best_val_accuracy"], ref_acc, atol=1e-6)
    assert_trees_close(best, ref_best, rtol=1e-3, atol=1e-4)
    # The best variables, not the last: their accuracy is the best one.
    acc = evaluate(model, best, val.images, val.labels)["accuracy"]
    np.testing.assert_allclose(acc, max(ref_accs), atol=1e-6)


def test_vmap_over_two_seeds_equals_separate_runs(setup):
    model, variables, data, val = setup
    keys = jax.random.split(jax.random.key(1), 2)
    batched, bm = jax.vmap(
        lambda k: train_early_stopping(
            model, variables, data, val, k, CFG, patience=PATIENCE
        )
    )(keys)
    for i in range(2):
        single, sm = train_early_stopping(
            model, variables, data, val, keys[i], CFG, patience=PATIENCE
        )
        assert_trees_close(
            jax.tree.map(lambda x: x[i], batched), single, rtol=1e-3, atol=1e-4
        )
        assert int(bm["epochs_run"][i]) == int(sm["epochs_run"])
        np.testing.assert_allclose(bm["val_accuracy"][i], sm["val_accuracy"], atol=1e-6)
    assert np.all(np.asarray(bm["epochs_run"]) < CFG.epochs)


def test_trials_with_poisoned_validation_sets_equal_one_at_a_time(setup):
    """Per-trial poisons in training and validation sets, `lax.map`ped trials."""
    model, variables, data, val = setup
    rng = np.random.default_rng(0)
    t, p = 2, 3
    poisons = rng.uniform(size=(t, p, *data.images.shape[1:])).astype(np.float32)
    rows = np.array([[0, 5, -1], [7, -1, -1]], np.int32)
    labels = np.full((t, p), 3, np.int32)
    data_t = data._replace(
        poison_images=jnp.asarray(poisons),
        poison_indices=jnp.asarray(rows),
        poison_labels=jnp.asarray(labels),
    )
    val_t = val._replace(
        poison_images=jnp.asarray(poisons),
        poison_indices=jnp.asarray(rows[:, ::-1].copy()),
        poison_labels=jnp.asarray(labels),
    )
    keys = jax.random.split(jax.random.key(2), t)
    cfg = TrainConfig(**{**CFG.__dict__, "epochs": 4})
    out, metrics = early_stopping_trials(
        model, variables, data_t, val_t, keys, cfg, patience=PATIENCE, trials="map"
    )
    for i in range(t):
        one = jax.tree.map(lambda x: x[i], data_t)
        one_val = jax.tree.map(lambda x: x[i], val_t)
        one = one._replace(images=data.images, labels=data.labels)
        one_val = one_val._replace(images=val.images, labels=val.labels)
        single, sm = train_early_stopping(
            model, variables, one, one_val, keys[i], cfg, patience=PATIENCE
        )
        assert_trees_close(
            jax.tree.map(lambda x: x[i], out), single, rtol=1e-3, atol=1e-4
        )
        np.testing.assert_allclose(
            metrics["val_accuracy"][i], sm["val_accuracy"], atol=1e-6
        )
