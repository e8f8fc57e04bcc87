"""Data augmentation inside the jitted step: random crop with padding, and flip."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def random_crop_flip(key: jax.Array, images: jax.Array, padding: int = 4) -> jax.Array:
    """torchvision's RandomCrop(size, padding, fill=0) + RandomHorizontalFlip(0.5).

    Each image is zero-padded by `padding` pixels on every side, cropped back to its
    size at a uniformly random offset, and mirrored left-right with probability 1/2.
    """
    n, h, w, _ = images.shape
    k_y, k_x, k_f = jax.random.split(key, 3)
    dy = jax.random.randint(k_y, (n,), 0, 2 * padding + 1)
    dx = jax.random.randint(k_x, (n,), 0, 2 * padding + 1)
    flip = jax.random.bernoulli(k_f, 0.5, (n,))
    pad = ((padding, padding), (padding, padding), (0, 0))

    def one(image, y, x, f):
        crop = jax.lax.dynamic_slice(
            jnp.pad(image, pad), (y, x, 0), (h, w, image.shape[-1])
        )
        return jnp.where(f, crop[:, ::-1], crop)

    return jax.vmap(one)(images, dy, dx, flip)
