"""Data augmentation inside the jitted step: random crop with padding, and flip.

A frozen feature extractor in eval mode maps each augmented image to a fixed
feature vector, and crop-with-padding + flip has only (2p + 1)^2 * 2 outcomes per
image (162 for p = 4). So a linear victim trained on augmented batches can look its
features up instead of running the extractor every step: `all_crop_flips` lists the
outcomes in `augmentation_index` order, and `crop_flip_params` draws exactly the
choices `random_crop_flip` makes, so both paths train the same victim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def crop_flip_params(key: jax.Array, n: int, padding: int):
    """The random offsets (dy, dx) in [0, 2p] and flips for `n` images."""
    k_y, k_x, k_f = jax.random.split(key, 3)
    dy = jax.random.randint(k_y, (n,), 0, 2 * padding + 1)
    dx = jax.random.randint(k_x, (n,), 0, 2 * padding + 1)
    flip = jax.random.bernoulli(k_f, 0.5, (n,))
    return dy, dx, flip


def crop_flip(image: jax.Array, dy, dx, flip, padding: int) -> jax.Array:
    """One image zero-padded by `padding`, cropped at (dy, dx), maybe mirrored."""
    h, w, c = image.shape
    pad = ((padding, padding), (padding, padding), (0, 0))
    crop = jax.lax.dynamic_slice(jnp.pad(image, pad), (dy, dx, 0), (h, w, c))
    return jnp.where(flip, crop[:, ::-1], crop)


def random_crop_flip(key: jax.Array, images: jax.Array, padding: int = 4) -> jax.Array:
    """torchvision's RandomCrop(size, padding, fill=0) + RandomHorizontalFlip(0.5).

    Each image is zero-padded by `padding` pixels on every side, cropped back to its
    size at a uniformly random offset, and mirrored left-right with probability 1/2.
    """
    dy, dx, flip = crop_flip_params(key, images.shape[0], padding)
    return jax.vmap(lambda im, y, x, f: crop_flip(im, y, x, f, padding))(
        images, dy, dx, flip
    )


def num_crop_flips(padding: int) -> int:
    return (2 * padding + 1) ** 2 * 2


def augmentation_index(dy, dx, flip, padding: int):
    """Index of the outcome (dy, dx, flip) in `all_crop_flips` order."""
    return (dy * (2 * padding + 1) + dx) * 2 + flip.astype(dy.dtype)


def crop_flip_of_index(a, padding: int):
    """The outcome (dy, dx, flip) with `augmentation_index` a (its inverse)."""
    side = 2 * padding + 1
    return a // 2 // side, a // 2 % side, (a % 2).astype(bool)


def crop_flip_views(image: jax.Array, a: jax.Array, padding: int) -> jax.Array:
    """The outcomes with indices `a` (K,) of one image: (K, H, W, C)."""
    dy, dx, flip = crop_flip_of_index(a, padding)
    return jax.vmap(lambda y, x, f: crop_flip(image, y, x, f, padding))(dy, dx, flip)


def all_crop_flips(image: jax.Array, padding: int) -> jax.Array:
    """Every outcome of `crop_flip` for one image: (num_crop_flips, H, W, C)."""
    return crop_flip_views(image, jnp.arange(num_crop_flips(padding)), padding)
