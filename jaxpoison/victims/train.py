"""Victim training as one pure function: `train(model, variables, data, key, config)`.

The same code serves (i) a single run, (ii) `jax.vmap` over seeds or over trials whose
training sets differ only in a few poisoned rows (victims/data.py swaps each trial's
poisons into the shared training set), and (iii) `jax.grad` through a short unrolled
prefix of training (the bilevel metalearner).

Modes:
  * "end_to_end": every parameter and BatchNorm statistic is trained. From scratch
    when `variables = model.init(key)`, fine-tuning (warm start) from pretrained ones.
  * "linear": the feature extractor is frozen (eval-mode BatchNorm) and only the head
    is trained, from the given head or from a fresh one (`cold_start_head`). Without
    augmentation, or with `cache_augmented_features`, the frozen features are
    computed once and looked up (victims/features.py).

Batches are PyTorch's DataLoader(shuffle=True, drop_last=False) with a zero-weight
padded last batch (`data.epoch_batches`): the loss is the weighted mean over real
examples; in end-to-end mode the padded rows do enter train-mode BatchNorm batch
statistics.

The configuration (`TrainConfig`), the data (`TrainData`, `make_train_data`,
`poisoned_batch`) and the feature cache (`cache_features`) live in their own modules
and are re-exported here.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jaxpoison.defences import training as defences
from jaxpoison.models import Model, class_logits, head_variables, with_head
from jaxpoison.victims import data_parallel, loops, regularizers
from jaxpoison.victims.augment import random_crop_flip
from jaxpoison.victims.config import (
    Schedule,
    TrainConfig,
    schedule,
    uses_cached_features,
    uses_regularizers,
)
from jaxpoison.victims.data import (
    TrainData,
    augmentation_key,
    check_labels,
    epoch_batches,
    make_train_data,
    num_examples,
    poisoned_batch,
)
from jaxpoison.victims.features import (
    FEATURE_BATCH,
    batch_features,
    cache_features,
    features_in_batches,
    frozen_features,
    map_in_batches,
    penultimate,
    poison_features,
)

# Names of the module before it was split (imported from here by drivers and tests).
_check_labels = check_labels
_frozen_features = penultimate

__all__ = [
    "FEATURE_BATCH",
    "Schedule",
    "TrainConfig",
    "TrainData",
    "TrainState",
    "Trainer",
    "cache_features",
    "class_logits",
    "evaluate",
    "features_in_batches",
    "frozen_features",
    "make_optimizer",
    "make_train_data",
    "make_trainer",
    "map_in_batches",
    "num_examples",
    "poisoned_batch",
    "schedule",
    "train",
    "train_vmapped",
    "uses_cached_features",
    "uses_regularizers",
    "weighted_loss",
]


def weighted_loss(outputs, labels, boxes, weights, box_loss_weight):
    """Weighted mean cross-entropy (+ weighted L1 box loss for a box head).

    Returns (loss, number correct).
    """
    logits = class_logits(outputs)
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    if isinstance(outputs, Mapping) and boxes is not None:
        l1 = jnp.abs(outputs["box"] - boxes).sum(axis=-1)
        per_example = per_example + box_loss_weight * l1
    total = jnp.maximum(weights.sum(), 1.0)
    loss = (weights * per_example).sum() / total
    correct = (weights * (jnp.argmax(logits, -1) == labels)).sum()
    return loss, correct


def make_optimizer(config: TrainConfig, steps_per_epoch: int):
    """optax chain: coupled L2 (PyTorch weight_decay) then SGD-momentum or Adam."""
    lr = optax.piecewise_constant_schedule(
        config.learning_rate,
        {m * steps_per_epoch: config.lr_decay for m in config.lr_milestones},
    )
    if config.optimizer == "sgd":
        base = optax.sgd(lr, momentum=config.momentum or None, nesterov=config.nesterov)
    else:
        base = optax.adam(lr)
    if config.weight_decay:
        return optax.chain(optax.add_decayed_weights(config.weight_decay), base)
    return base


class TrainState(NamedTuple):
    params: Any
    batch_stats: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array
    poison_features: jax.Array | None


class Trainer(NamedTuple):
    """The pieces of a training run; `loops.drive` strings them together."""

    init: Any
    batches: Any
    step: Any
    finish: Any
    epochs: int
    steps_per_epoch: int


def _collections(params, batch_stats) -> dict:
    """Flax variables from params and (possibly empty) BatchNorm statistics."""
    return {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}


@functools.lru_cache(maxsize=32)
def make_trainer(
    model: Model, config: TrainConfig, num_examples: int, mesh: Mesh | None = None
) -> Trainer:
    """Builds the pure pieces of training for a training set of `num_examples`;
    with a `mesh` (`data_parallel.batch_mesh`), each step's batch is split over it."""
    steps_per_epoch, epochs, total_steps = schedule(config, num_examples)
    tx = make_optimizer(config, steps_per_epoch)
    linear = config.mode == "linear"
    cached = uses_cached_features(config)
    # The loss needs every head (a box head's L1 term); logits are the "class" one.
    heads = {"all_heads": True} if len(model.heads) > 1 else {}

    def init(variables, data: TrainData, key) -> TrainState:
        head_key, loop_key = jax.random.split(key)
        if linear:
            trainable = head_variables(variables)
            if config.cold_start_head:
                trainable = head_variables(model.init(head_key))
        else:
            trainable = dict(variables)
        params = trainable["params"]
        stats = trainable.get("batch_stats", {})
        poison_feats = None
        if cached:
            poison_feats = poison_features(model, variables, data, loop_key, config)
        return TrainState(
            params,
            stats,
            tx.init(params),
            jnp.zeros((), jnp.int32),
            loop_key,
            poison_feats,
        )

    def batches(key, epoch):
        """(steps_per_epoch, batch) indices and weights for one epoch."""
        return epoch_batches(key, epoch, num_examples, config)

    def inputs(state, variables, data, idx, mix=None):
        """The batch's (z, labels, boxes): z the (augmented) images end to end,
        the frozen features in linear mode; nothing here depends on params."""
        if data.subset is not None:
            idx = data.subset[idx]
        x, y, boxes, hit, which = poisoned_batch(data, idx)
        if cached:
            f = batch_features(
                data,
                state.poison_features,
                idx,
                hit,
                which,
                state.key,
                state.step,
                config,
            )
            return f, y, boxes
        if config.augment:
            key = augmentation_key(state.key, state.step)
            x = random_crop_flip(key, x, config.crop_padding)
        x = data_parallel.split_examples(batch_defences(state, x, mix), mesh)
        return (x if not linear else penultimate(model, variables, x)), y, boxes

    def apply_victim(params, stats, z):
        """(outputs, new BatchNorm statistics, penultimate features) of `inputs`."""
        if not linear:
            (outputs, f), new_stats = model.apply_train(
                _collections(params, stats), z, **heads
            )
            return outputs, new_stats, f
        outputs, new_stats = model.apply_head(
            _collections(params, stats), z, train=True, **heads
        )
        return outputs, new_stats, z

    def forward(params, stats, state, variables, data, idx, mix=None):
        z, y, boxes = inputs(state, variables, data, idx, mix)
        outputs, new_stats, f = apply_victim(params, stats, z)
        return outputs, new_stats, y, boxes, f

    def head_fn(params, stats):
        """The classification head on given features (train mode)."""
        head = _collections(params, stats)
        if not linear:  # end to end: the head's part of all the variables
            head = head_variables(head)

        def apply(features):
            return model.apply_head(head, features, train=True)

        return apply

    def regularization(params, stats, state, outputs, features, y, weights):
        """Truong et al. 2020's regularisers (victims/regularizers.py), weighted."""
        total = 0.0
        if config.logit_squeeze:
            total += config.logit_squeeze * regularizers.logit_squeezing(
                class_logits(outputs), weights
            )
        if config.mixup:
            # Stream 2 of the loop key (stream 1 is `augmentation_key`'s).
            key = jax.random.fold_in(jax.random.fold_in(state.key, 2), state.step)
            mixed, _ = regularizers.manifold_mixup_loss(
                head_fn(params, stats), features, y, weights, key
            )
            total += config.mixup * mixed
        if config.contrastive:
            margin = config.contrastive_margin
            if config.contrastive_form == "hadsell":
                term = regularizers.hadsell_contrastive_loss(
                    features, y, weights, margin
                )
            else:  # Truong et al. Eq. 4-5 as printed; n = the number of classes
                term = regularizers.contrastive_loss(
                    features, y, weights, margin, model.num_classes
                )
            total += config.contrastive * term
        if config.snn:
            total += config.snn * regularizers.soft_nearest_neighbor_loss(
                features, y, weights, config.snn_temperature
            )
        return total

    def batch_defences(state, x, mix):
        """Training-time defences on the batch's images (defences/training.py);
        streams 3 and 4 of the loop key (1: augmentation, 2: manifold mixup)."""
        if config.cutout:
            key = jax.random.fold_in(jax.random.fold_in(state.key, 3), state.step)
            x = defences.cutout(key, x, config.cutout)
        return x if mix is None else defences.mix_images(x, *mix)

    def mixup_draw(state, x_dtype, weights):
        """Input mixup's (partners, lam) for this step, or None when off."""
        if not config.input_mixup:
            return None
        key = jax.random.fold_in(jax.random.fold_in(state.key, 4), state.step)
        return defences.mixup_pairs(key, weights, config.input_mixup, x_dtype)

    def private_gradients(state, variables, data, idx, weights, mix):
        """DP-SGD's gradient (defences/training.py): each example's gradient of
        its own loss, computed alone (end to end, BatchNorm on its running
        statistics, frozen: no example's gradient depends on another's), clipped,
        summed, noised. Returns (gradient, (correct, mean loss))."""
        z, y, boxes = inputs(state, variables, data, idx, mix)
        partner_y, lam = (y, 1.0) if mix is None else (y[mix[0]], mix[1])
        stats = state.batch_stats

        def example_loss(params, zi, yi, yp, bi):
            if linear:
                outputs, _ = model.apply_head(
                    _collections(params, stats), zi[None], train=True, **heads
                )
            else:
                outputs = model.apply(
                    _collections(params, stats), zi[None], train=False, **heads
                )[0]
            one = jnp.ones((1,), zi.dtype)
            box = None if bi is None else bi[None]
            la, ca = weighted_loss(outputs, yi[None], box, one, config.box_loss_weight)
            lb, cb = weighted_loss(outputs, yp[None], box, one, config.box_loss_weight)
            loss = lam * la + (1.0 - lam) * lb
            return loss, (lam * ca + (1.0 - lam) * cb, loss)

        grads, (correct, loss) = defences.per_example_gradients(
            example_loss, state.params, z, y, partner_y, boxes
        )
        key = jax.random.fold_in(jax.random.fold_in(state.key, 5), state.step)
        grads = defences.private_gradient(
            grads, weights, key, config.dp_clip_norm, config.dp_noise_multiplier
        )
        total = jnp.maximum(weights.sum(), 1.0)
        return grads, ((weights * correct).sum(), (weights * loss).sum() / total)

    def step(state: TrainState, variables, data: TrainData, idx, weights):
        if data.weights is not None:  # a filtering defence's removed rows weigh 0
            rows = idx if data.subset is None else data.subset[idx]
            weights = weights * data.weights[rows]
        mix = mixup_draw(state, data.poison_images.dtype, weights)

        def loss_fn(params):
            outputs, new_stats, y, boxes, features = forward(
                params, state.batch_stats, state, variables, data, idx, mix
            )

            def loss_of(labels):
                return weighted_loss(
                    outputs, labels, boxes, weights, config.box_loss_weight
                )

            if mix is None:
                loss, correct = loss_of(y)
            else:
                loss, correct = defences.mixed_loss(loss_of, y, *mix)
            if uses_regularizers(config):
                # The reported loss stays the cross-entropy; the gradient sees both.
                reg = regularization(
                    params, state.batch_stats, state, outputs, features, y, weights
                )
                return loss + reg, (new_stats, correct, loss)
            return loss, (new_stats, correct, loss)

        if config.dp_clip_norm:  # per-example clipping and noise, Hong et al. 2020
            grads, (correct, loss) = private_gradients(
                state, variables, data, idx, weights, mix
            )
            new_stats = state.batch_stats  # BatchNorm frozen under DP
        else:
            (_, (new_stats, correct, loss)), grads = jax.value_and_grad(
                loss_fn, has_aux=True
            )(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = state._replace(
            params=params,
            batch_stats=new_stats or state.batch_stats,
            opt_state=opt_state,
            step=state.step + 1,
        )
        # Steps past `max_steps` (the tail of the last epoch) change nothing.
        active = state.step < total_steps
        new = jax.tree.map(lambda a, b: jnp.where(active, a, b), new, state)
        w = weights * active
        return new, (loss * w.sum(), correct * active, w.sum())

    def finish(state: TrainState, variables):
        trained = _collections(state.params, state.batch_stats)
        return with_head(variables, trained) if linear else trained

    if config.remat:
        step = jax.checkpoint(step)
    step = data_parallel.traced_split(step, mesh)
    return Trainer(init, batches, step, finish, epochs, steps_per_epoch)


def _epoch_metrics(sums):
    loss_sum, correct, count = sums
    count = jnp.maximum(count.sum(axis=-1), 1.0)
    return {
        "loss": loss_sum.sum(axis=-1) / count,
        "accuracy": correct.sum(axis=-1) / count,
    }


def train(model: Model, variables, data: TrainData, key, config: TrainConfig):
    """Trains a victim; pure, so it works under `jax.vmap`, `jax.grad` and `jax.jit`.

    Args:
      model: the victim architecture.
      variables: starting variables (pretrained for fine-tuning and linear mode,
        `model.init(key)` from scratch).
      data: the training set with this trial's poisons (`make_train_data`).
      key: PRNG key for the head initialisation, shuffling and augmentation.
      config: `TrainConfig`.

    Outside any trace, with more than one local CPU device, end-to-end training
    splits each batch over them (victims/data_parallel.py); the result is the same
    up to float summation order, returned on the first device.

    Returns:
      (variables, metrics): trained variables; metrics "loss" and "accuracy" per
      epoch (training set, with poisons).
    """
    check_labels(model, data)
    traced = loops.is_traced((variables, data, key))
    mesh = None if traced else data_parallel.batch_mesh(config)
    data = jax.tree.map(jnp.asarray, data)
    trainer = make_trainer(model, config, num_examples(data), mesh)
    if uses_cached_features(config) and data.features is None:
        data = cache_features(model, variables, data, config)
    if mesh is not None:
        variables, data, key = data_parallel.replicate((variables, data, key), mesh)
    how = loops.choose(config.loop, config, (variables, data, key))
    state = loops.init(trainer, variables, data, key)
    state, sums = loops.drive(trainer, state, variables, data, how)
    result = trainer.finish(state, variables), _epoch_metrics(sums)
    return result if mesh is None else jax.device_put(result, jax.local_devices()[0])


def train_vmapped(
    model: Model,
    variables,
    data: TrainData,
    keys,
    config: TrainConfig,
    variables_axis: int | None = None,
    data_axes: TrainData | None = None,
    trials: str = "auto",
):
    """Many trainings as one program: `train` vmapped (or mapped) over trials.

    Trial t uses `keys[t]`, its poisons `data.poison_*[t]` (axis 0 of those fields
    when `poison_images` has one more axis than `images`, else shared; the clean
    images and labels are always shared), and `variables` shared unless
    `variables_axis=0`. Unlike `jax.vmap(train)`, the vmapped steps are driven by the
    loop `config.loop` selects (e.g. a host loop of jitted vmapped steps).

    `trials` says how trials share the program: "vmap" batches them into every step;
    "map" runs them one after another inside one jitted `lax.map` (on XLA:CPU,
    vmapping per-trial convolution kernels makes grouped convolutions that run
    several times slower than the same trials in sequence; benchmarks/
    victim_training.py); "auto" picks by `loops.choose_trials`.

    Returns:
      (variables, metrics), each with a leading trial axis.
    """
    if data_axes is None:  # per-trial poisons carry one more axis than the images
        per_trial = (
            0 if np.ndim(data.poison_images) == np.ndim(data.images) + 1 else None
        )
        subset = None if data.subset is None or np.ndim(data.subset) == 1 else 0
        weights = None if data.weights is None or np.ndim(data.weights) == 1 else 0
        data_axes = TrainData(
            None, None, per_trial, per_trial, per_trial, None, None, subset, weights
        )
    check_labels(model, data)
    data = jax.tree.map(jnp.asarray, data)
    trainer = make_trainer(model, config, num_examples(data))
    if uses_cached_features(config) and data.features is None:
        if variables_axis is None:
            data = cache_features(model, variables, data, config)
        else:  # one feature extractor per trial: per-trial features.
            features = jax.vmap(
                lambda v: cache_features(model, v, data, config).features,
                (variables_axis,),
            )(variables)
            data, data_axes = (
                data._replace(features=features),
                data_axes._replace(features=0),
            )
    if loops.choose_trials(trials, config) == "map":
        run = _mapped_train(model, config, variables_axis, data_axes)
        return run(variables, data, keys)
    vmapped = _vmapped_trainer(trainer, variables_axis, data_axes)
    how = loops.choose(config.loop, config, (variables, data, keys))
    state = loops.init(vmapped, variables, data, keys)
    state, sums = loops.drive(vmapped, state, variables, data, how)
    # sums are (epochs, steps, trials): put trials first.
    sums = jax.tree.map(lambda s: jnp.moveaxis(s, -1, 0), sums)
    return vmapped.finish(state, variables), _epoch_metrics(sums)


@functools.lru_cache(maxsize=32)
def _mapped_train(model: Model, config: TrainConfig, vax, dax: TrainData):
    """Trials in sequence inside one program: `lax.map` of `train` over trials."""

    def run(variables, data, keys):
        def one(t):
            v = variables if vax is None else jax.tree.map(lambda x: x[t], variables)
            fields = [
                f if ax is None or f is None else f[t]
                for f, ax in zip(data, dax, strict=True)
            ]
            return train(model, v, TrainData(*fields), keys[t], config)

        return jax.lax.map(one, jnp.arange(keys.shape[0]))

    return jax.jit(run)


@functools.lru_cache(maxsize=32)
def _vmapped_trainer(trainer: Trainer, vax: int | None, dax: TrainData) -> Trainer:
    return Trainer(
        init=jax.vmap(trainer.init, in_axes=(vax, dax, 0)),
        batches=jax.vmap(trainer.batches, in_axes=(0, None), out_axes=1),
        step=jax.vmap(trainer.step, in_axes=(0, vax, dax, 0, 0)),
        finish=jax.vmap(trainer.finish, in_axes=(0, vax)),
        epochs=trainer.epochs,
        steps_per_epoch=trainer.steps_per_epoch,
    )


def evaluate(model: Model, variables, images, labels, batch_size: int = 500):
    """Accuracy, per-example predictions and class probabilities (eval mode).

    `images` are uint8 (divided by 255) or float in [0, 1]. Pure: vmaps over variables.
    """
    images = jnp.asarray(images)
    if images.dtype == jnp.uint8:
        images = images.astype(jnp.float32) / 255.0
    n = images.shape[0]
    batch_size = min(batch_size, n)
    pad = -n % batch_size
    chunks = jnp.pad(images, ((0, pad),) + ((0, 0),) * 3).reshape(
        -1, batch_size, *images.shape[1:]
    )
    logits = jax.lax.map(lambda c: model.apply(variables, c, train=False)[0], chunks)
    probs = jax.nn.softmax(logits.reshape(-1, logits.shape[-1])[:n])
    preds = jnp.argmax(probs, -1)
    return {
        "accuracy": jnp.mean(preds == jnp.asarray(labels)),
        "predictions": preds,
        "probabilities": probs,
    }
