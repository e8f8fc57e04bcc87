"""Box-aware augmentation of the road-sign studies: rotation, flip, crop.

The road-sign studies train their two-head ResNet-34 (class + box) with random
rotation, horizontal flip and random crop, and evaluate on the centre crop; the box
target moves with the image (the studies rotate a mask of the box with the image
and take the mask's bounding box). Here one transform is, in this order:

  1. rotation by `angle` degrees about the image centre (border: reflection);
  2. a left-right mirror when `flip`;
  3. a crop of side `1 - 2 * margin` (a fraction of the image) at `offset`
     (y, x) in [0, 2 * margin], resized back to the image's size (bilinear).

Evaluation uses the centre crop: angle 0, no flip, offset (margin, margin). The
box's new value is the bounding box of its four rotated corners (the mask's
bounding box, up to the mask's pixel rounding), mirrored, shifted and scaled by the
crop, clipped to [0, 1]. Coordinates are normalised: pixel i's centre is
(i + 0.5) / size; boxes are tfds' [ymin, xmin, ymax, xmax].

The victims' trainer draws crop/flip inside its step (victims/augment.py). These
transforms are drawn once per (epoch, image) instead, by `epoch_copies`: E
augmented copies of the training set train as one pass over E x N images (one
shuffle of all of them instead of E shuffles of N), and a trial's poisons get the
same transforms as the rows they replace (`warp_rows`). Every image still sees a
fresh transform in each of its E passes.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxpoison.errors import UserInputError


@dataclasses.dataclass(frozen=True)
class BoxAugment:
    """The random transform's ranges (static).

    Attributes:
      rotation: maximum |angle| in degrees (uniform in [-rotation, rotation]).
      flip: mirror left-right with probability 1/2.
      crop_margin: crop side is 1 - 2 * crop_margin of the image; the random crop's
        offset is uniform in [0, 2 * crop_margin] per axis, the centre crop's is
        crop_margin.
    """

    rotation: float = 10.0
    flip: bool = True
    crop_margin: float = 8 / 300

    def __post_init__(self):
        if not 0.0 <= self.rotation <= 180.0:
            raise UserInputError(f"rotation {self.rotation} not in [0, 180] degrees")
        if not 0.0 <= self.crop_margin < 0.5:
            raise UserInputError(f"crop_margin {self.crop_margin} not in [0, 0.5)")


class Transform(NamedTuple):
    """Per-image transform parameters (leading axes: any)."""

    angle: jax.Array  # degrees
    flip: jax.Array  # bool
    offset: jax.Array  # (..., 2) crop corner (y, x), normalised


def draw(key, shape: tuple[int, ...], config: BoxAugment) -> Transform:
    """Random transforms of `shape` images."""
    k_angle, k_flip, k_offset = jax.random.split(key, 3)
    angle = jax.random.uniform(
        k_angle, shape, minval=-config.rotation, maxval=config.rotation
    )
    flip = jax.random.bernoulli(k_flip, 0.5, shape) & config.flip
    offset = jax.random.uniform(
        k_offset, (*shape, 2), minval=0.0, maxval=2 * config.crop_margin
    )
    return Transform(angle, flip, offset)


def centre(shape: tuple[int, ...], config: BoxAugment) -> Transform:
    """The evaluation transform: the centre crop only."""
    return Transform(
        jnp.zeros(shape),
        jnp.zeros(shape, bool),
        jnp.full((*shape, 2), config.crop_margin),
    )


def _rotate(points, angle):
    """Points (..., 2) as (y, x) rotated by `angle` degrees about (0.5, 0.5).

    In image coordinates (y down) a positive angle turns the picture clockwise.
    """
    t = jnp.deg2rad(angle)
    c, s = jnp.cos(t), jnp.sin(t)
    y, x = points[..., 0] - 0.5, points[..., 1] - 0.5
    return jnp.stack([s * x + c * y + 0.5, c * x - s * y + 0.5], axis=-1)


def warp_box(box, t: Transform, margin: float):
    """Where one box [ymin, xmin, ymax, xmax] lands under transform `t`."""
    y0, x0, y1, x1 = box[0], box[1], box[2], box[3]
    corners = jnp.array([[y0, x0], [y0, x1], [y1, x0], [y1, x1]])
    moved = _rotate(corners, t.angle)
    lo, hi = moved.min(axis=0), moved.max(axis=0)
    # Mirror: x -> 1 - x swaps the box's left and right edges.
    lo_x = jnp.where(t.flip, 1.0 - hi[1], lo[1])
    hi_x = jnp.where(t.flip, 1.0 - lo[1], hi[1])
    side = 1.0 - 2.0 * margin
    lo = (jnp.stack([lo[0], lo_x]) - t.offset) / side
    hi = (jnp.stack([hi[0], hi_x]) - t.offset) / side
    return jnp.clip(jnp.stack([lo[0], lo[1], hi[0], hi[1]]), 0.0, 1.0)


def warp_image(image, t: Transform, margin: float):
    """One float image (H, W, C) under transform `t`, resampled bilinearly.

    Each output pixel's centre is mapped back through the crop, the mirror and the
    rotation to a point of the input, which is interpolated (reflecting borders).
    """
    h, w, _ = image.shape
    side = 1.0 - 2.0 * margin
    u, v = jnp.meshgrid(
        (jnp.arange(h) + 0.5) / h, (jnp.arange(w) + 0.5) / w, indexing="ij"
    )
    y = t.offset[0] + side * u
    x = t.offset[1] + side * v
    x = jnp.where(t.flip, 1.0 - x, x)
    source = _rotate(jnp.stack([y, x], axis=-1), -t.angle)
    rows = source[..., 0] * h - 0.5
    cols = source[..., 1] * w - 0.5

    def channel(c):
        return jax.scipy.ndimage.map_coordinates(c, [rows, cols], 1, mode="reflect")

    return jax.vmap(channel, in_axes=2, out_axes=2)(image)


def warp(images, boxes, t: Transform, margin: float):
    """A batch (N, H, W, C) in [0, 1] and its boxes (N, 4) under per-image `t`."""
    images = jax.vmap(lambda im, a, f, o: warp_image(im, Transform(a, f, o), margin))(
        images, *t
    )
    boxes = jax.vmap(lambda b, a, f, o: warp_box(b, Transform(a, f, o), margin))(
        boxes, *t
    )
    return images, boxes


def to_uint8(images) -> jax.Array:
    """[0, 1] floats as stored 8-bit images (round half to even)."""
    return jnp.round(jnp.clip(images, 0.0, 1.0) * 255.0).astype(jnp.uint8)


def epoch_copies(images, boxes, key, epochs: int, config: BoxAugment):
    """`epochs` augmented copies of a training set, epoch-major.

    Args:
      images: uint8 (N, H, W, C); boxes: (N, 4).

    Returns:
      (images uint8 (E * N, H, W, C), boxes (E * N, 4), transforms (E, N)): row
      e * N + i is image i's copy for epoch e. Computed in batches of one epoch.
    """
    n = images.shape[0]
    transforms = draw(key, (epochs, n), config)
    fn = jax.jit(
        lambda x, b, t: warp(x.astype(jnp.float32) / 255.0, b, t, config.crop_margin)
    )
    out_images, out_boxes = [], []
    for e in range(epochs):
        t = jax.tree.map(lambda a, e=e: a[e], transforms)
        x, b = fn(jnp.asarray(images), jnp.asarray(boxes, jnp.float32), t)
        out_images.append(np.asarray(to_uint8(x)))
        out_boxes.append(np.asarray(b))
    return np.concatenate(out_images), np.concatenate(out_boxes), transforms


def copy_rows(rows, epochs: int, n: int):
    """Rows of `epoch_copies`'s output for source rows `rows` (..., R): (..., E * R),
    epoch-major; -1 (an unused poison slot) stays -1."""
    rows = jnp.asarray(rows)
    shifted = rows[..., None, :] + n * jnp.arange(epochs)[:, None]
    shifted = jnp.where(rows[..., None, :] >= 0, shifted, -1)
    return shifted.reshape(*rows.shape[:-1], epochs * rows.shape[-1])


def warp_rows(images, boxes, rows, transforms: Transform, margin: float):
    """Images (R, H, W, C) in [0, 1] (e.g. poisons) that replace source rows `rows`
    (R,) with `boxes` (R, 4), under every epoch's transform of those rows: (E * R,
    H, W, C) in `copy_rows` order, rounded to 8 bits like the copies they replace
    (whose boxes they keep). Slots with row -1 get any transform (never read)."""
    safe = jnp.maximum(jnp.asarray(rows), 0)
    t = jax.tree.map(lambda a: a[:, safe], transforms)  # (E, R)
    epochs = t.angle.shape[0]
    flat = jax.tree.map(lambda a: a.reshape(epochs * len(safe), *a.shape[2:]), t)
    tile = lambda a: jnp.tile(a, (epochs,) + (1,) * (a.ndim - 1))  # noqa: E731
    x, _ = warp(tile(images), tile(boxes), flat, margin)
    return to_uint8(x).astype(jnp.float32) / 255.0
