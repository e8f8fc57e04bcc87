"""Checks at the library's public boundary: shapes, dtypes and ranges.

Images in jaxpoison are floats in [0, 1] (pixel space; normalisation lives inside
the model), laid out (..., H, W, C). Shapes and dtypes are checked always (they are
static under `jit`); values only when they are concrete (not traced), since a
traced value cannot be inspected without a device-to-host copy.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from jaxpoison.errors import UserInputError


def is_concrete(x) -> bool:
    """True for numpy arrays, Python numbers and committed jax.Arrays (not tracers)."""
    return not isinstance(x, jax.core.Tracer)


def check_unit_images(images, name: str = "images", rank: int = 4) -> None:
    """`images` must be float, of rank `rank` (N, H, W, C), non-empty, in [0, 1].

    Catches what otherwise runs silently: uint8 or 0-255 float images (clipped to
    white by the constraints), images divided by 255 twice (all below 1/255),
    rank-2 images, empty batches, NaN pixels.
    """
    shape = np.shape(images)
    dtype = np.asarray(images).dtype if is_concrete(images) else images.dtype
    if not np.issubdtype(dtype, np.floating):
        raise UserInputError(
            f"{name} must be float in [0, 1], got dtype {dtype} (divide uint8 "
            "images by 255 once)"
        )
    if len(shape) != rank:
        raise UserInputError(
            f"{name} must have rank {rank} ({'N, ' if rank == 4 else ''}H, W, C), "
            f"got shape {shape}"
        )
    if rank == 4 and shape[0] == 0:
        raise UserInputError(f"{name} is an empty batch")
    if not is_concrete(images):
        return
    values = np.asarray(images)
    if not np.isfinite(values).all():
        raise UserInputError(f"{name} contain NaN or infinite pixels")
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 1.0:
        raise UserInputError(
            f"{name} must be in [0, 1], got values in [{low:.4g}, {high:.4g}]"
            + (" (0-255 pixels? divide by 255)" if high > 1.0 else "")
        )
    if 0.0 < high <= 1.0 / 255.0:
        raise UserInputError(
            f"{name} are all below 1/255 (max {high:.3g}): divided by 255 twice?"
        )


def check_unit_interval(value, name: str) -> None:
    """A concrete scalar (or array) must lie in [0, 1]; traced ones pass."""
    if not is_concrete(value):
        return
    values = np.asarray(value, np.float64)
    if not np.isfinite(values).all() or values.min() < 0.0 or values.max() > 1.0:
        raise UserInputError(f"{name} must be in [0, 1], got {np.asarray(value)}")


def check_finite_number(value: float, name: str) -> None:
    if not math.isfinite(value):
        raise UserInputError(f"{name} must be a finite number, got {value}")


def require(ok: bool, message: str) -> None:
    """Raises `UserInputError(message)` unless `ok`: a config check in one line."""
    if not ok:
        raise UserInputError(message)


def check_known(what: str, names, known) -> None:
    """Raises a one-line UserInputError naming the first of `names` (one name or
    several) that is not in `known`: "unknown dataset 'x'; known: a, b"."""
    for name in [names] if isinstance(names, str) else names:
        if name not in known:
            raise UserInputError(
                f"unknown {what} {name!r}; known: {', '.join(map(str, known))}"
            )
