"""The frozen-feature cache of linear victims.

A linear victim trains only the head on a frozen (eval-mode) feature extractor, so
the features of the clean images are computed once (`cache_features`) and looked
up in each step (`batch_features`). With augmentation, the crop/flip outcomes are
finite (162 per image for padding 4; victims/augment.py): the cache holds every
outcome of each clean image, and of each poison only the outcomes its epochs will
draw (`poison_views`, replayed from the trainer's key streams), so the cached victim
is the same victim as one that runs the extractor every step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxpoison.models import Model
from jaxpoison.victims.augment import (
    all_crop_flips,
    augmentation_index,
    crop_flip_params,
    crop_flip_views,
)
from jaxpoison.victims.config import TrainConfig, schedule
from jaxpoison.victims.data import (
    TrainData,
    augmentation_key,
    epoch_batches,
    num_examples,
)

# Forward passes per batch when computing frozen features in bulk: small enough for
# the activations to stay in cache (on XLA:CPU, ResNet-20's images/s drop at
# thousands of images per batch), large enough to fill a device.
FEATURE_BATCH = 256


def penultimate(model: Model, variables, images) -> jax.Array:
    """Eval-mode penultimate features of float images in [0, 1]."""
    return model.apply(variables, images, train=False)[1]


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
        lambda c: penultimate(model, variables, c), images, batch_size
    )


def frozen_features(model: Model, variables, images, config: TrainConfig):
    """Features of float images: (N, D), or (N, crop/flips, D) when augmenting."""
    if not config.augment:
        return penultimate(model, variables, images)
    views = jax.vmap(lambda im: all_crop_flips(im, config.crop_padding))(images)
    feats = penultimate(model, variables, views.reshape(-1, *images.shape[1:]))
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
    the images (a `shard_map` splitting the images over all of the mesh's axes).
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
    if mesh is not None:  # variables replicated, images split; no communication
        split = P(mesh.axis_names)
        fn = jax.shard_map(
            fn, mesh=mesh, in_specs=(P(), split), out_specs=split, check_vma=False
        )
    return jax.jit(fn)


def _features(model: Model, variables, images, config, batch_size: int, dtype):
    if config.augment:  # batch_size counts forward passes: images x outcomes
        batch_size = max(1, batch_size // (2 * config.crop_padding + 1) ** 2 // 2)
    return map_in_batches(
        lambda c: frozen_features(model, variables, c.astype(dtype) / 255.0, config),
        images,
        batch_size,
    )


def poison_views(data: TrainData, key, config: TrainConfig):
    """(epochs, P): the crop/flip outcome each poison draws in each epoch.

    Replays the trainer's batches (`epoch_batches`) and the augmentation draws of
    every step from its loop `key` (a poison is in at most one weighted position per
    epoch); 0 where a poison is not drawn.
    """
    n_train = num_examples(data)
    steps_per_epoch, epochs, _ = schedule(config, n_train)
    p = data.poison_indices.shape[0]
    n = data.images.shape[0]
    # Row -> poison, the first poison naming the row (as `poisoned_batch`).
    poison_of_row = (
        jnp.full((n,), p, jnp.int32)
        .at[data.poison_indices]
        .min(jnp.arange(p, dtype=jnp.int32))
    )

    def epoch_views(epoch):
        idx, weights = epoch_batches(key, epoch, n_train, config)
        rows = idx if data.subset is None else data.subset[idx]
        steps = epoch * steps_per_epoch + jnp.arange(steps_per_epoch)
        views = jax.vmap(
            lambda s: augmentation_index(
                *crop_flip_params(
                    augmentation_key(key, s), config.batch_size, config.crop_padding
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


def poison_features(model: Model, variables, data: TrainData, key, config):
    """Features of the trial's poisons for `batch_features`: (P, D), or with
    augmentation (epochs, P, D) for the views training will draw (one forward pass
    per poison and epoch instead of all crop/flip outcomes)."""
    if not config.augment:
        return frozen_features(model, variables, data.poison_images, config)
    views = poison_views(data, key, config)  # (E, P)
    images = jax.vmap(
        lambda im, a: crop_flip_views(im, a, config.crop_padding),
        in_axes=(0, 1),
        out_axes=1,
    )(data.poison_images, views)  # (E, P, H, W, C)
    feats = features_in_batches(model, variables, images.reshape(-1, *images.shape[2:]))
    return feats.reshape(*views.shape, -1)


def batch_features(data: TrainData, poison_feats, idx, hit, which, key, step, config):
    """Cached features of the rows `idx` of step `step`'s batch, poisons swapped in.

    With augmentation, each row's features are those of the crop/flip outcome
    `random_crop_flip` draws at that step from the trainer's loop `key`, and a
    poison's those of its view in the step's epoch (`poison_features`).
    """
    pf = poison_feats
    if config.augment:
        params = crop_flip_params(
            augmentation_key(key, step), idx.shape[0], config.crop_padding
        )
        a = augmentation_index(*params, config.crop_padding)
        steps_per_epoch, epochs, _ = schedule(config, num_examples(data))
        epoch = jnp.minimum(step // steps_per_epoch, epochs - 1)
        clean = data.features[idx, a]
        pf = pf[epoch, which] if pf.shape[1] else pf[0]
    else:
        clean, pf = data.features[idx], pf[which] if pf.shape[0] else pf
    return jnp.where(hit[:, None], pf, clean) if pf.shape[0] else clean
