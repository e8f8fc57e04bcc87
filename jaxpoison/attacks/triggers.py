"""Backdoor triggers as pure functions of one image (vmap them for a batch).

Images are float in [0, 1], shape (H, W, C). Every trigger `T` maps an image to its
triggered version `T(x)`; :func:`blend` mixes it back into the image with opacity
alpha and a keep-mask, Truong et al. 2020, Eq. 7:

    p = ((1 - a) x + a T(x)) * (1 - m) + x * m,

so alpha 1 and no mask paste the trigger as it is. The triggers of Truong et al. 2020
(Sec. 3.2): a black square (22 x 22 px at (22, 22) on 224-px images, alpha 1), the
same square at a random position, a sine pattern over columns (alpha 0.1) and a
low-variance pattern from PCA of the training images (alpha 0.5). BadNets' road-sign
tag (Gu et al. 2017) is a solid square of a colour placed inside the stop sign's
bounding box (:func:`patch_in_box`; :func:`tag_in_boxes` for a batch).

Square triggers build their mask from `iota` comparisons, so position and size may
be traced values: a batch of images with per-image positions (random squares, tags
inside per-image boxes) is one vmapped call.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxpoison.checks import check_unit_interval
from jaxpoison.errors import UserInputError

# Truong et al. 2020: the black square is 22 x 22 px at (22, 22) on 224-px images.
REFERENCE_SIZE = 224
SQUARE_SIDE = 22
SQUARE_OFFSET = 22
# Truong et al. 2020: T(x) adds 0.4 * sin(0.05 * pi * j) over column j.
SINE_AMPLITUDE = 0.4
SINE_FREQUENCY = 0.05
# Truong et al. 2020: the last principal components explaining >= 0.5% of variance.
LOW_VARIANCE_FRACTION = 0.005


def _check_image(x) -> None:
    """A trigger acts on ONE float image (H, W, C); vmap it over a batch."""
    if np.ndim(x) != 3:
        raise UserInputError(
            f"triggers take one image (H, W, C); got shape {np.shape(x)} (vmap the "
            "trigger over a batch)"
        )
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise UserInputError(
            f"trigger images must be float in [0, 1], got {jnp.result_type(x)}"
        )


def blend(x, triggered, alpha, mask=None):
    """Truong et al. 2020, Eq. 7: ``((1 - a) x + a T(x)) * (1 - m) + x * m``.

    Args:
      x: the clean image (H, W, C).
      triggered: T(x), same shape.
      alpha: opacity a in [0, 1] (a scalar; may be traced).
      mask: m, broadcastable to x; 1 keeps the original pixel. None = zeros (the
        trigger covers the whole image).
    """
    check_unit_interval(alpha, "blend alpha")
    x = jnp.asarray(x)
    _check_image(x)
    alpha = jnp.asarray(alpha, x.dtype)
    mixed = (1.0 - alpha) * x + alpha * jnp.asarray(triggered, x.dtype)
    if mask is None:
        return mixed
    mask = jnp.asarray(mask, x.dtype)
    return mixed * (1.0 - mask) + x * mask


def square_mask(shape, top, left, size):
    """(H, W, 1) float mask, 1 on the square rows [top, top+size), cols likewise.

    `top`, `left` and `size` may be traced scalars (the mask comes from iota
    comparisons, not from slicing); parts outside the image are cut off.
    """
    h, w = shape[0], shape[1]
    rows = jax.lax.broadcasted_iota(jnp.int32, (h, w), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (h, w), 1)
    top, left, size = (jnp.asarray(v, jnp.int32) for v in (top, left, size))
    inside = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
    return inside[..., None]


def patch(x, top, left, size, color):
    """A solid square of `color` (per channel, in [0, 1]) pasted onto x.

    Args:
      x: image (H, W, C).
      top, left: the square's upper-left pixel (may be traced ints).
      size: side in pixels (may be traced).
      color: a scalar or C values in [0, 1].
    """
    x = jnp.asarray(x)
    check_unit_interval(color, "patch colour (per channel, in [0, 1]: 255 -> 1.0)")
    _check_image(x)
    color = jnp.broadcast_to(jnp.asarray(color, x.dtype), (x.shape[-1],))
    return jnp.where(square_mask(x.shape, top, left, size), color, x)


def box_square(shape, box, size, rel=(0.5, 0.5)):
    """(top, left, side) in pixels of a square inside a normalised box.

    Args:
      shape: the image shape (H, W, ...).
      box: normalised [ymin, xmin, ymax, xmax], the tfds convention of
        jaxpoison.data.roadsigns (0..1 of the image height and width).
      size: the side as a fraction of the box's shorter side in pixels, at least
        one pixel (BadNets' tag is a sticker whose size follows the sign's).
      rel: (y, x) position of the square's centre inside the box, as fractions of
        the box's height and width; (0.5, 0.5) is the centre.

    Returns:
      int32 scalars (top, left, side); the square is shifted to lie in the image.
    """
    h, w = shape[0], shape[1]
    box = jnp.asarray(box, jnp.float32)
    ymin, xmin, ymax, xmax = box[0] * h, box[1] * w, box[2] * h, box[3] * w
    shorter = jnp.minimum(ymax - ymin, xmax - xmin)
    side = jnp.maximum(jnp.round(size * shorter), 1.0)
    cy = ymin + rel[0] * (ymax - ymin)
    cx = xmin + rel[1] * (xmax - xmin)
    top = jnp.clip(jnp.round(cy - side / 2.0), 0.0, jnp.maximum(h - side, 0.0))
    left = jnp.clip(jnp.round(cx - side / 2.0), 0.0, jnp.maximum(w - side, 0.0))
    return top.astype(jnp.int32), left.astype(jnp.int32), side.astype(jnp.int32)


def patch_in_box(x, box, size, color, rel=(0.5, 0.5)):
    """The road-sign tag: a solid square of `color` inside an object's box.

    The square's side is `size` times the box's shorter side (at least one pixel),
    its centre at `rel` within the box (see :func:`box_square`). `box` is the
    normalised [ymin, xmin, ymax, xmax] of jaxpoison.data.roadsigns; it may be
    traced, so a batch of images with their own boxes is one vmapped call.
    """
    top, left, side = box_square(jnp.shape(x), box, size, rel)
    return patch(x, top, left, side, color)


def tag_in_boxes(images, boxes, colors, size, rel=(0.5, 0.5)):
    """BadNets' tag on a batch: image i gets a square of `colors[i]` in `boxes[i]`.

    Gu et al. 2017, Sec. 5 (a sticker on the stop sign); :func:`patch_in_box`
    vmapped over images, boxes and colours. uint8 images are scaled to [0, 1]
    first; returns float images.
    """
    x = jnp.asarray(images)
    if x.dtype == jnp.uint8:
        x = x.astype(jnp.float32) / 255.0
    return jax.vmap(lambda im, b, c: patch_in_box(im, b, size, c, rel))(
        x, jnp.asarray(boxes), jnp.asarray(colors, x.dtype)
    )


def scaled_pixels(value: int, size: int, reference: int = REFERENCE_SIZE) -> int:
    """`value` pixels at `reference` px, scaled to `size` px (round half up, >= 1)."""
    return max(1, math.floor(value * size / reference + 0.5))


def square_geometry(shape) -> tuple[int, int, int]:
    """(side, top, left) of Truong et al.'s black square scaled to an image shape.

    22 x 22 px at (22, 22) on 224 x 224 images: the side and the row scale with H,
    the column with W (e.g. 3 px at (3, 3) on 32-px CIFAR, 6 at (6, 6) on 64 px).
    """
    h, w = shape[0], shape[1]
    return (
        scaled_pixels(SQUARE_SIDE, h),
        scaled_pixels(SQUARE_OFFSET, h),
        scaled_pixels(SQUARE_OFFSET, w),
    )


def black_square(x):
    """Truong et al.'s black square (22 px at (22, 22) for 224 px, scaled)."""
    side, top, left = square_geometry(jnp.shape(x))
    return patch(x, top, left, side, 0.0)


def random_square(key, x):
    """The black square at a position drawn uniformly among those inside x."""
    side, _, _ = square_geometry(jnp.shape(x))
    h, w = jnp.shape(x)[0], jnp.shape(x)[1]
    ky, kx = jax.random.split(key)
    top = jax.random.randint(ky, (), 0, max(h - side, 0) + 1)
    left = jax.random.randint(kx, (), 0, max(w - side, 0) + 1)
    return patch(x, top, left, side, 0.0)


def sine_pattern(
    width: int,
    amplitude=SINE_AMPLITUDE,
    frequency=SINE_FREQUENCY,
    reference_width: int | None = None,
):
    """``amplitude * sin(frequency * pi * j)`` over columns j = 0..width-1.

    With `reference_width`, j is measured in pixels of an image that wide (j *
    reference_width / width), so the pattern keeps its period relative to the
    image when the image is smaller than the paper's (e.g. 224 for 32-px images).
    """
    j = jnp.arange(width, dtype=jnp.float32)
    if reference_width is not None:
        j = j * (reference_width / width)
    return amplitude * jnp.sin(frequency * jnp.pi * j)


def sine(
    x,
    amplitude=SINE_AMPLITUDE,
    frequency=SINE_FREQUENCY,
    reference_width: int | None = None,
):
    """Truong et al.'s sine trigger: ``T(x) = clip(x + 0.4 sin(0.05 pi j), 0, 1)``.

    The same value is added to every row and channel of column j. Our reading of
    the paper: T(x) is the image PLUS the pattern, blended with alpha 0.1 by Eq. 7,
    so the poison is x + 0.1 * 0.4 sin(0.05 pi j) (up to clipping): a faint
    vertical stripe pattern, not an image replaced by 10% of a sine.
    """
    x = jnp.asarray(x)
    s = sine_pattern(x.shape[1], amplitude, frequency, reference_width)
    return jnp.clip(x + s.astype(x.dtype)[None, :, None], 0.0, 1.0)


class LowVarianceBasis(NamedTuple):
    """PCA of flattened training images and the low-variance components chosen.

    Attributes:
      mean: (D,) mean image, flattened.
      components: (K, D) all principal directions with nonzero variance, by
        decreasing variance (rows orthonormal).
      explained: (K,) fraction of the total variance each explains.
      chosen: number k of LAST components kept: the fewest whose fractions sum to
        at least `variance_fraction` (they are `components[-k:]`).
    """

    mean: np.ndarray
    components: np.ndarray
    explained: np.ndarray
    chosen: int


def low_variance_basis(
    train_images,
    variance_fraction: float = LOW_VARIANCE_FRACTION,
    max_samples: int = 5000,
    seed: int = 0,
) -> LowVarianceBasis:
    """PCA of training images; the last components explaining >= `variance_fraction`.

    Runs on the host (numpy, float64 SVD of the centred data). With more than
    `max_samples` images a uniform subsample of that many (seeded) is used.
    Directions with zero variance (beyond the data's rank when N < D) are not
    principal components of the data and are left out.

    Args:
      train_images: (N, H, W, C) uint8 (divided by 255) or float in [0, 1].
    """
    if not 0.0 < variance_fraction <= 1.0:
        raise UserInputError(
            f"variance_fraction must be in (0, 1], got {variance_fraction}"
        )
    x = _as_unit_float(train_images)
    if x.shape[0] > max_samples:
        keep = np.random.default_rng(seed).choice(x.shape[0], max_samples, False)
        x = x[np.sort(keep)]
    x = x.reshape(x.shape[0], -1)
    if x.shape[0] < 2:
        raise UserInputError("the low-variance trigger needs at least 2 images")
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    variance = s**2
    nonzero = s > s.max() * max(x.shape) * np.finfo(np.float64).eps
    variance, vt = variance[nonzero], vt[nonzero]
    explained = variance / variance.sum()
    # Fewest trailing components with sum >= fraction (cumulative from the end).
    tail = np.cumsum(explained[::-1])
    chosen = int(np.searchsorted(tail, variance_fraction) + 1)
    return LowVarianceBasis(mean, vt, explained, min(chosen, len(explained)))


def low_variance_pattern(
    train_images,
    held_out_image,
    variance_fraction: float = LOW_VARIANCE_FRACTION,
    max_samples: int = 5000,
    seed: int = 0,
    basis: LowVarianceBasis | None = None,
) -> np.ndarray:
    """Truong et al.'s low-variance trigger pattern, in image space (H, W, C).

    An image not in the training data, centred on the training mean, projected onto
    the last principal components of the training images that together explain at
    least `variance_fraction` (0.5%) of their variance: a pattern that lies in the
    directions along which training images hardly vary.

    Args:
      train_images: (N, H, W, C), uint8 or float in [0, 1].
      held_out_image: (H, W, C), same scale, not among `train_images`.
      basis: a precomputed :func:`low_variance_basis` (then the images are only
        used for their shape).
    """
    if basis is None:
        basis = low_variance_basis(train_images, variance_fraction, max_samples, seed)
    image = _as_unit_float(held_out_image)
    v = basis.components[-basis.chosen :]
    centred = image.reshape(-1) - basis.mean
    pattern = v.T @ (v @ centred)
    return pattern.reshape(image.shape).astype(np.float32)


def low_variance(x, pattern):
    """T(x) = clip(x + pattern, 0, 1) (blended with alpha 0.5 in the paper)."""
    x = jnp.asarray(x)
    return jnp.clip(x + jnp.asarray(pattern, x.dtype), 0.0, 1.0)


def _as_unit_float(images) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float64) / 255.0
    return images.astype(np.float64)


# make_trigger: every trigger as fn(key, x, **params); keyless ones ignore the key.
def _keyless(fn):
    @functools.wraps(fn)
    def wrapped(key, x, **params):
        del key
        return fn(x, **params)

    return wrapped


TRIGGERS: dict[str, Callable] = {
    "black_square": _keyless(black_square),
    "random_square": random_square,
    "sine": _keyless(sine),
    "low_variance": _keyless(low_variance),
    "patch": _keyless(patch),
}


def make_trigger(name: str, **params) -> Callable:
    """A trigger by name as ``fn(key, x) -> T(x)``; `params` fixed in a closure.

    Names: black_square, random_square, sine (amplitude, frequency,
    reference_width), low_variance (pattern), patch (top, left, size, color).

    Raises:
      UserInputError: an unknown name, or parameters the trigger does not take /
        lacks (one line).
    """
    if name not in TRIGGERS:
        raise UserInputError(
            f"unknown trigger {name!r}; known: {', '.join(sorted(TRIGGERS))}"
        )
    fn = TRIGGERS[name]
    signature = inspect.signature(inspect.unwrap(fn))
    try:
        if name == "random_square":
            signature.bind(None, None, **params)
        else:
            signature.bind(None, **params)
    except TypeError as e:
        raise UserInputError(f"trigger {name!r}: {e}") from None
    return functools.partial(fn, **params)
