"""Victim training as one pure function: `train(model, variables, data, key, config)`.

The same code serves (i) a single run, (ii) `jax.vmap` over seeds or over trials whose
training sets differ only in a few poisoned rows, and (iii) `jax.grad` through a short
unrolled prefix of training (the bilevel metalearner). A trial never copies the
training set: it carries its poisons and the indices of the rows they replace, and the
batch gather swaps them in (`where(is_poisoned, poison, clean)`), so T vmapped trials
cost T x the poisons, not T x the dataset.

Modes:
  * "end_to_end": every parameter and BatchNorm statistic is trained. From scratch
    when `variables = model.init(key)`, fine-tuning (warm start) from pretrained ones.
  * "linear": the feature extractor is frozen (eval-mode BatchNorm) and only the head
    is trained, from the given head or from a fresh one (`cold_start_head`). Without
    augmentation the clean features are computed once and cached.

Batches follow PyTorch's DataLoader(shuffle=True, drop_last=False): one permutation
per epoch and a smaller last batch, implemented with fixed shapes by padding the last
batch with zero-weight examples (the loss is the weighted mean over real examples; in
end-to-end mode the padded rows do enter train-mode BatchNorm batch statistics).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jaxpoison.errors import UserInputError
from jaxpoison.models import Model, head_variables, with_head
from jaxpoison.sweep.sharding import per_device
from jaxpoison.victims import loops, regularizers
from jaxpoison.victims.augment import (
    all_crop_flips,
    augmentation_index,
    crop_flip_params,
    crop_flip_views,
    random_crop_flip,
)

# Forward passes per batch when computing frozen features in bulk: small enough for
# the activations to stay in cache (on XLA:CPU, ResNet-20's images/s drop at
# thousands of images per batch), large enough to fill a device.
FEATURE_BATCH = 256


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of victim training (static: changing one recompiles).

    Attributes:
      mode: "end_to_end" or "linear" (frozen feature extractor, head trained).
      cold_start_head: in linear mode, start the head from a fresh initialisation.
      optimizer: "sgd" (heavy-ball momentum, PyTorch semantics) or "adam".
      learning_rate: base learning rate.
      momentum: SGD momentum.
      nesterov: SGD Nesterov momentum.
      weight_decay: L2 added to the gradient (PyTorch `weight_decay`, coupled).
      epochs: passes over the training set.
      batch_size: examples per step.
      lr_milestones: epochs at which the learning rate is multiplied by `lr_decay`.
      lr_decay: the factor for `lr_milestones`.
      augment: random crop (zero padding `crop_padding`) and horizontal flip.
      crop_padding: pixels of zero padding for the random crop.
      cache_augmented_features: linear mode with augmentation: compute the frozen
        features of every crop/flip outcome of the clean images once (162 per image
        for padding 4), and of each poison the outcomes its epochs will draw (one
        per epoch, replayed from the key), and look them up in each step; the same
        victim as running the extractor per step (see victims/augment.py), much
        faster over many epochs or trials.
      box_loss_weight: weight of the L1 box loss for models with a box head
        (1/1000 in the road-sign studies).
      max_steps: stop after this many steps (an unrolled prefix); None = all.
      loop: "scan", "step" (host loop of jitted steps), "epoch" (host loop of
        jitted epochs) or "auto" (see `loops.choose`).
      remat: rematerialise each step under `jax.checkpoint` (long unrolls).
      logit_squeeze: weight of the logit-squeezing term (victims/regularizers.py;
        Truong et al. 2020 Sec. 3.4); 0 = off. Likewise:
      mixup: weight of the manifold-mixup cross-entropy on penultimate features.
      contrastive: weight of the contrastive loss (Truong et al. Eq. 4-5), with
        margin `contrastive_margin`.
      snn: weight of the soft-nearest-neighbour loss (Truong et al. Eq. 6), at
        temperature `snn_temperature` (a negative weight is Frosst et al.'s
        entangling variant). Contrastive and SNN act on the penultimate
        features: in linear mode those are frozen and the terms add a constant.
    """

    mode: str = "end_to_end"
    cold_start_head: bool = False
    optimizer: str = "sgd"
    learning_rate: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    epochs: int = 1
    batch_size: int = 128
    lr_milestones: tuple[int, ...] = ()
    lr_decay: float = 0.1
    augment: bool = False
    cache_augmented_features: bool = False
    crop_padding: int = 4
    box_loss_weight: float = 1e-3
    max_steps: int | None = None
    loop: str = "auto"
    remat: bool = False
    logit_squeeze: float = 0.0
    mixup: float = 0.0
    contrastive: float = 0.0
    contrastive_margin: float = 1.0
    snn: float = 0.0
    snn_temperature: float = 1.0

    def __post_init__(self):
        if self.mode not in ("end_to_end", "linear"):
            raise UserInputError(
                f"unknown training mode {self.mode!r}: end_to_end, linear"
            )
        if self.optimizer not in ("sgd", "adam"):
            raise UserInputError(f"unknown optimizer {self.optimizer!r}: sgd, adam")
        if self.loop not in loops.LOOPS:
            raise UserInputError(
                f"unknown loop {self.loop!r}: {', '.join(loops.LOOPS)}"
            )
        if self.batch_size < 1 or self.epochs < 0:
            raise UserInputError("batch_size must be >= 1 and epochs >= 0")
        if self.contrastive_margin <= 0 or self.snn_temperature <= 0:
            raise UserInputError("contrastive_margin and snn_temperature must be > 0")
        object.__setattr__(self, "lr_milestones", tuple(self.lr_milestones))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> TrainConfig:
        """From a dict or ConfigDict; an unknown key is a one-line UserInputError."""
        values = dict(values.items())
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise UserInputError(
                f"unknown training option(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(names))}"
            )
        return cls(**values)


class TrainData(NamedTuple):
    """A training set, shared by all trials, plus one trial's poisons.

    Attributes:
      images: uint8 (N, H, W, C) clean images (shared; never copied per trial).
      labels: int32 (N,).
      poison_images: float (P, H, W, C) in [0, 1].
      poison_indices: int32 (P,) rows of `images` the poisons replace; -1 marks an
        unused slot, so trials with fewer poisons share one shape.
      poison_labels: int32 (P,) labels the poisoned rows carry.
      boxes: float32 (N, 4) box targets for two-head models, or None.
      features: float (N, D) cached frozen features of `images`, or None.
      subset: int32 (M,) rows of `images` this trial trains on (e.g. the benchmark's
        first 250 per class without the setup's bases), or None for all N. Poison
        indices still refer to rows of `images`.
    """

    images: jax.Array
    labels: jax.Array
    poison_images: jax.Array
    poison_indices: jax.Array
    poison_labels: jax.Array
    boxes: jax.Array | None = None
    features: jax.Array | None = None
    subset: jax.Array | None = None


def make_train_data(
    images,
    labels,
    poison_images=None,
    poison_indices=None,
    poison_labels=None,
    boxes=None,
    subset=None,
) -> TrainData:
    """TrainData; without poisons, zero of them. Clean-label poisons keep labels."""
    if poison_images is None:
        poison_images = np.zeros((0, *np.shape(images)[1:]), np.float32)
        poison_indices = np.zeros((0,), np.int32)
    if poison_labels is None:
        poison_labels = jnp.asarray(labels)[jnp.asarray(poison_indices)]
    return TrainData(
        images,
        labels,
        poison_images,
        poison_indices,
        poison_labels,
        boxes,
        None,
        subset,
    )


def poisoned_batch(data: TrainData, idx: jax.Array):
    """Gathers rows `idx`, swapping in the trial's poisons where they belong.

    Returns (images float in [0, 1], labels, boxes or None, hit, which): `hit[i]`
    says row `idx[i]` is poisoned and `which[i]` which poison replaces it.
    """
    dtype = data.poison_images.dtype
    x = data.images[idx].astype(dtype) / 255.0
    y = data.labels[idx]
    match = idx[:, None] == data.poison_indices[None, :]
    hit = match.any(axis=1)
    which = jnp.zeros_like(idx)
    if data.poison_images.shape[0]:  # static: trials without poisons skip the swap.
        which = jnp.argmax(match, axis=1)
        x = jnp.where(hit[:, None, None, None], data.poison_images[which], x)
        y = jnp.where(hit, data.poison_labels[which], y)
    boxes = None if data.boxes is None else data.boxes[idx]
    return x, y, boxes, hit, which


def class_logits(outputs):
    """Classification logits of a model's outputs (a two-head model returns a dict)."""
    return outputs["class"] if isinstance(outputs, Mapping) else outputs


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
    schedule = optax.piecewise_constant_schedule(
        config.learning_rate,
        {m * steps_per_epoch: config.lr_decay for m in config.lr_milestones},
    )
    if config.optimizer == "sgd":
        base = optax.sgd(
            schedule, momentum=config.momentum or None, nesterov=config.nesterov
        )
    else:
        base = optax.adam(schedule)
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


def _frozen_features(model: Model, variables, images) -> jax.Array:
    return model.apply(variables, images, train=False)[1]


def uses_regularizers(config: TrainConfig) -> bool:
    """Whether any of Truong et al.'s regularisers is on (static)."""
    return bool(
        config.logit_squeeze or config.mixup or config.contrastive or config.snn
    )


def uses_cached_features(config: TrainConfig) -> bool:
    """Linear victims train on cached features (per crop/flip when augmenting)."""
    return config.mode == "linear" and (
        not config.augment or config.cache_augmented_features
    )


def map_in_batches(fn, xs, batch_size: int):
    """`fn` over `xs` in batches of `batch_size` rows (`lax.map` over the padded
    batches, so one batch is live at a time); outputs concatenated, padding dropped."""
    n = xs.shape[0]
    batch_size = max(1, min(batch_size, n))
    pad = -n % batch_size
    chunks = jnp.pad(xs, ((0, pad),) + ((0, 0),) * (xs.ndim - 1))
    out = jax.lax.map(fn, chunks.reshape(-1, batch_size, *xs.shape[1:]))
    return out.reshape(-1, *out.shape[2:])[:n]


def features_in_batches(model: Model, variables, images, batch_size=FEATURE_BATCH):
    """Frozen features of many float images, `batch_size` forward passes at a time."""
    return map_in_batches(
        lambda c: _frozen_features(model, variables, c), images, batch_size
    )


def frozen_features(model: Model, variables, images, config: TrainConfig):
    """Features of float images: (N, D), or (N, crop/flips, D) when augmenting."""
    if not config.augment:
        return _frozen_features(model, variables, images)
    views = jax.vmap(lambda im: all_crop_flips(im, config.crop_padding))(images)
    feats = _frozen_features(model, variables, views.reshape(-1, *images.shape[1:]))
    return feats.reshape(images.shape[0], views.shape[1], -1)


def cache_features(
    model: Model,
    variables,
    data: TrainData,
    config: TrainConfig | None = None,
    batch_size: int = 500,
    mesh: Mesh | None = None,
) -> TrainData:
    """`data` with the frozen features of its clean images (linear mode).

    With `config.augment`, features of every crop/flip outcome: (N, 162, D). With a
    `mesh` of several devices, each device computes the features of its share of
    the images (`sweep.sharding.per_device`).
    """
    config = config or TrainConfig(mode="linear")
    dtype = np.dtype(data.poison_images.dtype)
    images = data.images  # may be a tracer: `train` calls this under jit/vmap
    n = images.shape[0]
    devices = 1 if mesh is None else mesh.size
    fn = _features_fn(model, config, batch_size, dtype, mesh if devices > 1 else None)
    pad = -n % devices
    if pad:  # whole shares per device; the padding rows are dropped below
        images = jnp.concatenate([images, jnp.repeat(images[-1:], pad, axis=0)])
    return data._replace(features=fn(variables, images)[:n])


@functools.lru_cache(maxsize=32)
def _features_fn(model: Model, config: TrainConfig, batch_size: int, dtype, mesh):
    fn = functools.partial(
        _features, model, config=config, batch_size=batch_size, dtype=dtype
    )
    if mesh is not None:
        fn = per_device(fn, mesh, (False, True))
    return jax.jit(fn)


def _features(model: Model, variables, images, config, batch_size: int, dtype):
    if config.augment:  # batch_size counts forward passes: images x outcomes
        batch_size = max(1, batch_size // (2 * config.crop_padding + 1) ** 2 // 2)
    return map_in_batches(
        lambda c: frozen_features(model, variables, c.astype(dtype) / 255.0, config),
        images,
        batch_size,
    )


@functools.lru_cache(maxsize=32)
def make_trainer(model: Model, config: TrainConfig, num_examples: int) -> Trainer:
    """Builds the pure pieces of training for a training set of `num_examples`."""
    steps_per_epoch = max(1, math.ceil(num_examples / config.batch_size))
    padded = steps_per_epoch * config.batch_size
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    epochs = math.ceil(total_steps / steps_per_epoch)
    tx = make_optimizer(config, steps_per_epoch)
    linear = config.mode == "linear"
    cached = uses_cached_features(config)

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
        poison_features = None
        if cached and config.augment:
            poison_features = poison_view_features(variables, data, loop_key)
        elif cached:
            poison_features = frozen_features(
                model, variables, data.poison_images, config
            )
        return TrainState(
            params,
            stats,
            tx.init(params),
            jnp.zeros((), jnp.int32),
            loop_key,
            poison_features,
        )

    def batches(key, epoch):
        """(steps_per_epoch, batch) indices and weights for one epoch."""
        perm = jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)
        idx = jnp.resize(perm, padded)  # repeats perm; the padding has zero weight
        weights = (jnp.arange(padded) < num_examples).astype(jnp.float32)
        shape = (steps_per_epoch, config.batch_size)
        return idx.reshape(shape), weights.reshape(shape)

    def aug_key_at(key, step):
        return jax.random.fold_in(jax.random.fold_in(key, 1), step)

    def aug_key(state):
        return aug_key_at(state.key, state.step)

    def poison_views(data: TrainData, key):
        """(epochs, P): the crop/flip outcome each poison draws in each epoch.

        Replays `batches` and the augmentation draws of every step (a poison is in
        at most one weighted position per epoch); 0 where a poison is not drawn.
        """
        p = data.poison_indices.shape[0]
        n = data.images.shape[0]
        # Row -> poison, the first poison naming the row (as `poisoned_batch`).
        poison_of_row = (
            jnp.full((n,), p, jnp.int32)
            .at[data.poison_indices]
            .min(jnp.arange(p, dtype=jnp.int32))
        )

        def epoch_views(epoch):
            idx, weights = batches(key, epoch)
            rows = idx if data.subset is None else data.subset[idx]
            steps = epoch * steps_per_epoch + jnp.arange(steps_per_epoch)
            views = jax.vmap(
                lambda s: augmentation_index(
                    *crop_flip_params(
                        aug_key_at(key, s), config.batch_size, config.crop_padding
                    ),
                    config.crop_padding,
                )
            )(steps)
            which = jnp.where(weights > 0, poison_of_row[rows], p)
            return (
                jnp.zeros((p,), views.dtype)
                .at[which.ravel()]
                .set(views.ravel(), mode="drop")
            )

        return jax.lax.map(epoch_views, jnp.arange(epochs))

    def poison_view_features(variables, data: TrainData, key):
        """(epochs, P, D) features of the poison views training will draw: epochs
        forward passes per poison instead of all crop/flip outcomes."""
        views = poison_views(data, key)  # (E, P)
        images = jax.vmap(
            lambda im, a: crop_flip_views(im, a, config.crop_padding),
            in_axes=(0, 1),
            out_axes=1,
        )(data.poison_images, views)  # (E, P, H, W, C)
        feats = features_in_batches(
            model, variables, images.reshape(-1, *images.shape[2:])
        )
        return feats.reshape(*views.shape, -1)

    def forward(params, stats, state, variables, data, idx):
        if data.subset is not None:
            idx = data.subset[idx]
        x, y, boxes, hit, which = poisoned_batch(data, idx)
        if cached:
            pf = state.poison_features
            if config.augment:  # the outcome random_crop_flip would have drawn
                params_ = crop_flip_params(
                    aug_key(state), idx.shape[0], config.crop_padding
                )
                a = augmentation_index(*params_, config.crop_padding)
                epoch = jnp.minimum(state.step // steps_per_epoch, epochs - 1)
                clean = data.features[idx, a]
                pf = pf[epoch, which] if pf.shape[1] else pf[0]
            else:
                clean, pf = data.features[idx], pf[which] if pf.shape[0] else pf
            f = jnp.where(hit[:, None], pf, clean) if pf.shape[0] else clean
        else:
            if config.augment:
                x = random_crop_flip(aug_key(state), x, config.crop_padding)
            if not linear:
                (outputs, f), new_stats = model.apply_train(
                    _collections(params, stats), x
                )
                return outputs, new_stats, y, boxes, f
            f = _frozen_features(model, variables, x)
        outputs, new_stats = model.apply_head(
            _collections(params, stats), f, train=True
        )
        return outputs, new_stats, y, boxes, f

    def head_fn(params, stats):
        """The classification head on given features (train mode)."""
        head = _collections(params, stats)
        if not linear:  # end to end: the head's part of all the variables
            head = head_variables(head)

        def apply(features):
            outputs, head_stats = model.apply_head(head, features, train=True)
            return class_logits(outputs), head_stats

        return apply

    def regularization(params, stats, state, outputs, features, y, weights):
        """Truong et al. 2020's regularisers (victims/regularizers.py), weighted."""
        total = 0.0
        if config.logit_squeeze:
            total += config.logit_squeeze * regularizers.logit_squeezing(
                class_logits(outputs), weights
            )
        if config.mixup:
            key = jax.random.fold_in(jax.random.fold_in(state.key, 2), state.step)
            mixed, _ = regularizers.manifold_mixup_loss(
                head_fn(params, stats), features, y, weights, key
            )
            total += config.mixup * mixed
        if config.contrastive:
            total += config.contrastive * regularizers.contrastive_loss(
                features, y, weights, config.contrastive_margin
            )
        if config.snn:
            total += config.snn * regularizers.soft_nearest_neighbor_loss(
                features, y, weights, config.snn_temperature
            )
        return total

    def step(state: TrainState, variables, data: TrainData, idx, weights):
        def loss_fn(params):
            outputs, new_stats, y, boxes, features = forward(
                params, state.batch_stats, state, variables, data, idx
            )
            loss, correct = weighted_loss(
                outputs, y, boxes, weights, config.box_loss_weight
            )
            if uses_regularizers(config):
                # The reported loss stays the cross-entropy; the gradient sees both.
                reg = regularization(
                    params, state.batch_stats, state, outputs, features, y, weights
                )
                return loss + reg, (new_stats, correct, loss)
            return loss, (new_stats, correct, loss)

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

    Returns:
      (variables, metrics): trained variables; metrics "loss" and "accuracy" per
      epoch (training set, with poisons).
    """
    _check_labels(model, data)
    data = jax.tree.map(jnp.asarray, data)
    trainer = make_trainer(model, config, num_examples(data))
    if uses_cached_features(config) and data.features is None:
        data = cache_features(model, variables, data, config)
    how = loops.choose(config.loop, config, (variables, data, key))
    state = loops.init(trainer, variables, data, key)
    state, sums = loops.drive(trainer, state, variables, data, how)
    return trainer.finish(state, variables), _epoch_metrics(sums)


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
        data_axes = TrainData(
            None, None, per_trial, per_trial, per_trial, None, None, subset
        )
    _check_labels(model, data)
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


def num_examples(data: TrainData) -> int:
    """Training-set size: the subset's (last axis, if per trial) or all images."""
    return data.images.shape[0] if data.subset is None else data.subset.shape[-1]


def _check_labels(model: Model, data: TrainData) -> None:
    labels = data.labels
    if isinstance(labels, jax.core.Tracer):
        return
    labels = np.asarray(labels)
    bad = labels[(labels < 0) | (labels >= model.num_classes)]
    if bad.size:
        raise UserInputError(
            f"label {int(bad[0])} is out of range for {model.name} with "
            f"{model.num_classes} classes"
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
    logits = jax.lax.map(
        lambda c: class_logits(model.apply(variables, c, train=False)[0]), chunks
    )
    probs = jax.nn.softmax(logits.reshape(-1, logits.shape[-1])[:n])
    preds = jnp.argmax(probs, -1)
    return {
        "accuracy": jnp.mean(preds == jnp.asarray(labels)),
        "predictions": preds,
        "probabilities": probs,
    }
