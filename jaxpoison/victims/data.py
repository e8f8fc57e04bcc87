"""A victim's training set and the batches it sees, poisons swapped in.

A trial never copies the training set: it carries its poisons and the indices of the
rows they replace, and the batch gather swaps them in (`where(is_poisoned, poison,
clean)`), so T vmapped trials cost T x the poisons, not T x the dataset.

Batches follow PyTorch's DataLoader(shuffle=True, drop_last=False): one permutation
per epoch and a smaller last batch, implemented with fixed shapes by padding the last
batch with zero-weight examples (`epoch_batches`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxpoison.errors import UserInputError
from jaxpoison.models import Model
from jaxpoison.victims.config import TrainConfig, schedule


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
      weights: float (N,) per-row weights of `images` rows, 0 or 1 (a filtering
        defence's kept rows: a removed row stays in the batches with weight 0),
        or None for all 1.
    """

    images: jax.Array
    labels: jax.Array
    poison_images: jax.Array
    poison_indices: jax.Array
    poison_labels: jax.Array
    boxes: jax.Array | None = None
    features: jax.Array | None = None
    subset: jax.Array | None = None
    weights: jax.Array | None = None


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
    check_poison_rows(poison_indices, np.shape(images)[0])
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


def check_poison_rows(poison_indices, num_images: int) -> None:
    """Poisoned rows must be rows of the training set, or -1 (an unused slot).

    Out-of-range indices would otherwise be clamped by XLA's gather and poison the
    wrong (last) image without a word.
    """
    if isinstance(poison_indices, jax.core.Tracer):
        return
    rows = np.asarray(poison_indices)
    bad = rows[(rows < -1) | (rows >= num_images)]
    if bad.size:
        raise UserInputError(
            f"poison row {int(bad.flat[0])} is out of range: rows are 0..."
            f"{num_images - 1}, or -1 for an unused slot"
        )


def num_examples(data: TrainData) -> int:
    """Training-set size: the subset's (last axis, if per trial) or all images."""
    return data.images.shape[0] if data.subset is None else data.subset.shape[-1]


def check_labels(model: Model, data: TrainData) -> None:
    """Raises UserInputError for a (concrete) label outside the model's classes."""
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


def epoch_batches(key, epoch, num_examples: int, config: TrainConfig):
    """(steps_per_epoch, batch_size) row positions and weights of one epoch.

    A permutation of the `num_examples` positions (of `subset`, if any) from
    `fold_in(key, epoch)`; the last batch is filled up by repeating the permutation
    with zero-weight rows.
    """
    steps_per_epoch = schedule(config, num_examples).steps_per_epoch
    padded = steps_per_epoch * config.batch_size
    perm = jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)
    idx = jnp.resize(perm, padded)  # repeats perm; the padding has zero weight
    weights = (jnp.arange(padded) < num_examples).astype(jnp.float32)
    shape = (steps_per_epoch, config.batch_size)
    return idx.reshape(shape), weights.reshape(shape)


def augmentation_key(key, step):
    """The key of step `step`'s crop/flip draws: stream 1 of the trainer's loop key
    (stream 2 is manifold mixup's), shared with the feature cache's replay."""
    return jax.random.fold_in(jax.random.fold_in(key, 1), step)


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
