"""Training with early stopping on validation accuracy, as one pure function.

Truong et al. 2020 (Sec. 4) train every victim until the validation accuracy has
not improved for 5 epochs and keep the best model (Keras' EarlyStopping with
`patience=5, restore_best_weights=True`); the clean fine-tuning defence is a
second such training, on clean data, from the poisoned victim.

`train_early_stopping` runs `config.epochs` epochs (the maximum) under `lax.scan`;
after each epoch it evaluates on the validation set, keeps the best variables
(strictly higher accuracy; the first of equal ones), and once `patience` epochs in
a row have not improved, the remaining epochs are skipped by `lax.cond` (under
`jax.vmap` the condition becomes a select: a stopped trial still runs, masked, and
changes nothing; under `lax.map` it is really skipped). So it vmaps over seeds and
trials, and `early_stopping_trials` runs many as one program like `train_vmapped`.

Validation sets are `TrainData` too, so a poisoned validation split (Truong's
poison-set val) swaps in each trial's poisons exactly as training batches do.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxpoison.models import Model
from jaxpoison.victims import loops
from jaxpoison.victims.config import TrainConfig, uses_cached_features
from jaxpoison.victims.data import (
    TrainData,
    check_labels,
    num_examples,
    poisoned_batch,
)
from jaxpoison.victims.features import cache_features
from jaxpoison.victims.train import _epoch_metrics, evaluate, make_trainer


def validation_set(val: TrainData):
    """(float images, labels) of a validation TrainData, its poisons swapped in."""
    idx = jnp.arange(val.images.shape[0])
    x, y, _, _, _ = poisoned_batch(val, idx)
    return x, y


def _early_stopping(model, variables, data, val, key, config, patience, eval_batch):
    trainer = make_trainer(model, config, num_examples(data))
    if uses_cached_features(config) and data.features is None:
        data = cache_features(model, variables, data, config)
    val_x, val_y = validation_set(val)
    state = trainer.init(variables, data, key)
    steps = trainer.steps_per_epoch

    def run_epoch(state, epoch):
        state, sums = loops._epoch(trainer, state, variables, data, epoch)
        trained = trainer.finish(state, variables)
        acc = evaluate(model, trained, val_x, val_y, eval_batch)["accuracy"]
        return state, sums, trained, acc

    def skip_epoch(state, epoch):
        del epoch
        zeros = jnp.zeros((steps,), jnp.float32)
        acc = jnp.asarray(-1.0, jnp.float32)
        return state, (zeros, zeros, zeros), trainer.finish(state, variables), acc

    def body(carry, epoch):
        state, best, best_acc, best_epoch, bad, stopped = carry
        state, sums, trained, acc = jax.lax.cond(
            stopped, skip_epoch, run_epoch, state, epoch
        )
        improved = jnp.logical_and(~stopped, acc > best_acc)
        best = jax.tree.map(lambda a, b: jnp.where(improved, a, b), trained, best)
        best_acc = jnp.where(improved, acc, best_acc)
        best_epoch = jnp.where(improved, epoch, best_epoch)
        bad = jnp.where(improved, 0, jnp.where(stopped, bad, bad + 1))
        stopped = jnp.logical_or(stopped, bad >= patience)
        ran = jnp.logical_not(carry[5])
        return (state, best, best_acc, best_epoch, bad, stopped), (sums, acc, ran)

    start = trainer.finish(state, variables)
    carry = (
        state,
        start,
        jnp.asarray(-jnp.inf, jnp.float32),
        jnp.asarray(-1, jnp.int32),
        jnp.asarray(0, jnp.int32),
        jnp.asarray(False),
    )
    (_, best, best_acc, best_epoch, _, _), (sums, accs, ran) = jax.lax.scan(
        body, carry, jnp.arange(trainer.epochs)
    )
    metrics = _epoch_metrics(sums)
    metrics.update(
        val_accuracy=accs,  # -1 for the epochs skipped after stopping
        best_val_accuracy=best_acc,
        best_epoch=best_epoch,
        epochs_run=ran.sum(),
    )
    return best, metrics


@functools.lru_cache(maxsize=32)
def _jitted(model: Model, config: TrainConfig, patience: int, eval_batch: int):
    return jax.jit(
        functools.partial(
            _early_stopping,
            model,
            config=config,
            patience=patience,
            eval_batch=eval_batch,
        )
    )


def train_early_stopping(
    model: Model,
    variables,
    data: TrainData,
    val: TrainData,
    key,
    config: TrainConfig,
    patience: int = 5,
    eval_batch: int = 500,
):
    """Trains up to `config.epochs` epochs, stopping after `patience` without
    improvement of the validation accuracy; returns the best variables.

    Pure (works under `jax.vmap`, `jax.jit`); called from Python it runs as one
    jitted program.

    Args:
      model, variables, data, key, config: as for `victims.train`.
      val: validation set as `TrainData` (`make_train_data(images, labels)`, or with
        poisons to swap in); accuracy is measured in eval mode.
      patience: epochs without improvement before stopping (Truong et al.: 5).
      eval_batch: examples per forward pass of the validation.

    Returns:
      (variables, metrics): the variables after the best epoch; per-epoch "loss",
      "accuracy" (training) and "val_accuracy" (-1 where skipped), and
      "best_val_accuracy", "best_epoch" (0-based), "epochs_run".
    """
    check_labels(model, data)
    data = jax.tree.map(jnp.asarray, data)
    val = jax.tree.map(jnp.asarray, val)
    if loops.is_traced((variables, data, val, key)):
        return _early_stopping(
            model, variables, data, val, key, config, patience, eval_batch
        )
    return _jitted(model, config, patience, eval_batch)(variables, data, val, key)


def default_axes(data: TrainData) -> TrainData:
    """Per-trial poisons carry one more axis than the images (as train_vmapped)."""
    per_trial = 0 if np.ndim(data.poison_images) == np.ndim(data.images) + 1 else None
    return TrainData(None, None, per_trial, per_trial, per_trial, None, None, None)


@functools.lru_cache(maxsize=32)
def _trials_fn(model, config, patience, eval_batch, vax, dax, vdax, how):
    def one(variables, data, val, key):
        return _early_stopping(
            model, variables, data, val, key, config, patience, eval_batch
        )

    if how == "vmap":
        return jax.jit(jax.vmap(one, in_axes=(vax, dax, vdax, 0)))

    def run(variables, data, val, keys):
        def trial(t):
            v = variables if vax is None else jax.tree.map(lambda x: x[t], variables)
            d = TrainData(
                *[
                    f if ax is None or f is None else f[t]
                    for f, ax in zip(data, dax, strict=True)
                ]
            )
            w = TrainData(
                *[
                    f if ax is None or f is None else f[t]
                    for f, ax in zip(val, vdax, strict=True)
                ]
            )
            return one(v, d, w, keys[t])

        return jax.lax.map(trial, jnp.arange(keys.shape[0]))

    return jax.jit(run)


def early_stopping_trials(
    model: Model,
    variables,
    data: TrainData,
    val: TrainData,
    keys,
    config: TrainConfig,
    patience: int = 5,
    variables_axis: int | None = None,
    trials: str = "auto",
    eval_batch: int = 500,
):
    """Many early-stopped trainings as one program (`train_vmapped`'s counterpart).

    Trial t uses `keys[t]`, the poisons `data.poison_*[t]` and `val.poison_*[t]`
    where those carry a trial axis, and `variables` shared unless
    `variables_axis=0` (e.g. fine-tuning many poisoned victims). `trials`: "vmap",
    "map" (`lax.map`: trials in sequence, stopped epochs really skipped) or "auto"
    (`loops.choose_trials`).

    Returns:
      (variables, metrics), each with a leading trial axis.
    """
    check_labels(model, data)
    data = jax.tree.map(jnp.asarray, data)
    val = jax.tree.map(jnp.asarray, val)
    if uses_cached_features(config) and data.features is not None:
        raise ValueError("pass data without features: each trial caches its own")
    how = loops.choose_trials(trials, config)
    fn = _trials_fn(
        model,
        config,
        patience,
        eval_batch,
        variables_axis,
        default_axes(data),
        default_axes(val),
        how,
    )
    return fn(variables, data, val, keys)
