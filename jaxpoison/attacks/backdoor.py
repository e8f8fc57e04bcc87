"""Backdoor poisoning plans: which rows get a trigger and which label they carry.

Two strategies:

* Count-based label flipping (BadNets, Gu et al. 2017): `n` training images of a
  source class get the trigger and the target label, in place
  (:func:`label_flip_plan`).
* Poison rate lambda (Truong et al. 2020, Eq. 8-9): floor(lambda * N_t) poisoned
  samples, drawn from the source classes in proportion to their sizes, SUPPLANT
  samples of the poison class t, so every class keeps its size
  (:func:`poison_rate_plan`). One-to-one: one source class; many-to-one: all
  classes but t.

A plan is a :class:`PoisonPlan` of index arrays that plug into the victim trainer's
index swap (jaxpoison.victims.TrainData): the poisons are triggered copies of the
rows `source_rows`, swapped into the rows `poison_indices` with labels
`poison_labels`. Slots with index -1 are unused, so plans of different sizes pad to
one shape (:func:`pad_plan`) and train as one vmapped program.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxpoison.attacks.triggers import blend
from jaxpoison.errors import UserInputError

# floor(lambda * N_t) with a tolerance: 0.29 * 100 is 28.999999999999996 in floats.
_FLOOR_EPS = 1e-9


class PoisonPlan(NamedTuple):
    """Rows of one poisoning.

    Attributes:
      source_rows: int32 (P,) training rows whose images get the trigger.
      poison_indices: int32 (P,) rows the triggered copies replace (the trainer's
        `TrainData.poison_indices`); equal to `source_rows` for label flipping,
        rows of the poison class for the poison-rate strategy. -1 = unused slot.
      poison_labels: int32 (P,) labels the poisoned rows carry.
    """

    source_rows: np.ndarray
    poison_indices: np.ndarray
    poison_labels: np.ndarray


def num_poisons(class_size: int, rate: float) -> int:
    """floor(lambda * N_t), Truong et al. 2020, Eq. 8."""
    if not 0.0 <= rate <= 1.0:
        raise UserInputError(f"poison rate must be in [0, 1], got {rate}")
    if class_size < 0:
        raise UserInputError(f"class size must be >= 0, got {class_size}")
    return int(math.floor(rate * class_size + _FLOOR_EPS))


def _sources(num_classes: int, poison_class: int, source_classes) -> list[int]:
    if not 0 <= poison_class < num_classes:
        raise UserInputError(
            f"poison class {poison_class} is out of range: classes are "
            f"0..{num_classes - 1}"
        )
    if source_classes is None:
        return [c for c in range(num_classes) if c != poison_class]
    sources = sorted({int(c) for c in np.atleast_1d(source_classes)})
    for c in sources:
        if not 0 <= c < num_classes:
            raise UserInputError(
                f"source class {c} is out of range: classes are 0..{num_classes - 1}"
            )
    if poison_class in sources:
        raise UserInputError(
            f"the poison class {poison_class} cannot also be a source class"
        )
    if not sources:
        raise UserInputError("source_classes is empty: name at least one class")
    return sources


def expected_poison_counts(
    class_counts: Sequence[int],
    poison_class: int,
    rate: float,
    source_classes: Sequence[int] | None = None,
) -> tuple[np.ndarray, float]:
    """Expected poisoned samples per source class, Truong et al. 2020, Eq. 8-9.

    ``n = floor(rate * N_t)`` samples are drawn from the source classes S (default:
    every class but t) in proportion to their sizes, so class s contributes
    ``n * N_s / sum_{j in S} N_j`` in expectation (0 for t and non-sources).

    The effective poison rate is the fraction of the training set that is poisoned,
    ``n / sum_j N_j`` (the supplanted rows keep every class size, so the training
    set has ``sum_j N_j`` rows).

    Returns:
      (per_class_counts float64 (K,), effective_rate float).
    """
    counts = np.asarray(class_counts, np.float64)
    if counts.ndim != 1 or np.any(counts < 0):
        raise UserInputError("class_counts must be a 1-d list of class sizes >= 0")
    sources = _sources(len(counts), int(poison_class), source_classes)
    n = num_poisons(int(counts[poison_class]), rate)
    pool = counts[sources].sum()
    per_class = np.zeros_like(counts)
    if pool > 0:
        per_class[sources] = n * counts[sources] / pool
    return per_class, float(n / counts.sum())


def _rng(key_or_seed) -> np.random.Generator:
    """A numpy Generator from an int seed or a JAX PRNG key (typed or raw)."""
    if isinstance(key_or_seed, int | np.integer):
        return np.random.default_rng(int(key_or_seed))
    key = (
        jnp.asarray(key_or_seed)
        if not isinstance(key_or_seed, jax.Array)
        else (key_or_seed)
    )
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.random.default_rng(np.asarray(key, np.uint32).ravel().tolist())


def poison_rate_plan(
    labels,
    poison_class: int,
    rate: float,
    key_or_seed,
    source_classes: Sequence[int] | None = None,
) -> PoisonPlan:
    """Truong et al.'s poison-rate plan: triggered copies supplant poison-class rows.

    ``n = floor(rate * N_t)`` source rows are drawn uniformly without replacement
    from the union of the source classes (so each class contributes in proportion
    to its size: :func:`expected_poison_counts` in expectation), and ``n`` rows of
    the poison class t, drawn likewise, are supplanted: each carries a triggered
    copy of a source image and label t. Every class keeps its size: t has
    ``N_t - n`` clean and ``n`` poisoned rows; the source images stay in their own
    classes as well (copies, not moves).

    Args:
      labels: (N,) training labels.
      poison_class: t, the class the backdoor leads to.
      rate: lambda in [0, 1].
      key_or_seed: an int seed or a JAX PRNG key (the draw is on the host).
      source_classes: one class (one-to-one) or several; default every class but
        t (many-to-one).

    Returns:
      A :class:`PoisonPlan` with n slots (sorted by the supplanted row).
    """
    labels = np.asarray(labels)
    num_classes = int(labels.max()) + 1 if labels.size else 0
    sources = _sources(
        max(num_classes, int(poison_class) + 1), int(poison_class), source_classes
    )
    target_rows = np.flatnonzero(labels == poison_class)
    n = num_poisons(len(target_rows), rate)
    pool = np.flatnonzero(np.isin(labels, sources))
    if n > len(pool):
        raise UserInputError(
            f"poison rate {rate} needs {n} source images; the source classes "
            f"{sources} have {len(pool)}"
        )
    rng = _rng(key_or_seed)
    source_rows = rng.choice(pool, n, replace=False)
    supplanted = rng.choice(target_rows, n, replace=False)
    order = np.argsort(supplanted)
    return PoisonPlan(
        source_rows[order].astype(np.int32),
        supplanted[order].astype(np.int32),
        np.full(n, poison_class, np.int32),
    )


def label_flip_plan(
    labels, source_class: int, target_class: int, n: int, seed
) -> PoisonPlan:
    """BadNets: `n` random images of `source_class` get the trigger and the target
    label, in their own rows (poison_indices = source_rows)."""
    labels = np.asarray(labels)
    rows = np.flatnonzero(labels == source_class)
    if n < 0 or n > len(rows):
        raise UserInputError(
            f"cannot poison {n} images of class {source_class}: it has {len(rows)}"
        )
    if source_class == target_class:
        raise UserInputError("source and target class of a label flip must differ")
    picked = np.sort(_rng(seed).choice(rows, n, replace=False)).astype(np.int32)
    return PoisonPlan(picked, picked.copy(), np.full(n, target_class, np.int32))


def pad_plan(plan: PoisonPlan, size: int) -> PoisonPlan:
    """The plan with unused slots (-1) appended up to `size` (for stacking trials).

    Unused slots have source row -1 too; their poisons are never swapped in.
    """
    p = len(plan.poison_indices)
    if size < p:
        raise UserInputError(f"cannot pad a plan of {p} poisons to {size}")
    fill = np.full(size - p, -1, np.int32)
    return PoisonPlan(
        np.concatenate([plan.source_rows, fill]).astype(np.int32),
        np.concatenate([plan.poison_indices, fill]).astype(np.int32),
        np.concatenate([plan.poison_labels, np.zeros(size - p, np.int32)]).astype(
            np.int32
        ),
    )


def stack_plans(plans: Sequence[PoisonPlan]) -> PoisonPlan:
    """Plans padded to the longest and stacked: fields (T, P), one row per trial."""
    size = max((len(p.poison_indices) for p in plans), default=0)
    padded = [pad_plan(p, size) for p in plans]
    return PoisonPlan(*(np.stack(f) for f in zip(*padded, strict=True)))


def apply_trigger_to_rows(
    images_uint8,
    rows,
    trigger_fn: Callable,
    alpha,
    key,
    mask=None,
    args: tuple = (),
):
    """Triggered, blended copies of training rows: the poisons of a plan.

    ``p = blend(x, T(x), alpha, mask)`` (Truong et al. 2020, Eq. 7) for each
    ``x = images[row] / 255``. Pure and jit/vmap-friendly; rows of -1 (unused
    slots) give an image that is never swapped in.

    Args:
      images_uint8: (N, H, W, C) uint8 training images.
      rows: (P,) int rows (e.g. `PoisonPlan.source_rows`).
      trigger_fn: ``fn(key, x, *row_args) -> T(x)`` (e.g. from `make_trigger`).
      alpha: opacity (scalar).
      key: PRNG key, split into one per row.
      mask: Eq. 7's keep-mask (broadcast to one image), or None.
      args: per-row arrays (P, ...) passed to `trigger_fn` after x (e.g. boxes).

    Returns:
      float32 (P, H, W, C) poisons in [0, 1].
    """
    rows = jnp.asarray(rows)
    x = jnp.asarray(images_uint8)[jnp.maximum(rows, 0)].astype(jnp.float32) / 255.0
    keys = jax.random.split(key, rows.shape[0])
    triggered = jax.vmap(trigger_fn)(keys, x, *args)
    return jax.vmap(lambda a, b: blend(a, b, alpha, mask))(x, triggered)


def attack_success_rate(predictions, true_labels, target_class):
    """Fraction of triggered test images whose true class is not the target that
    are classified as the target (NaN if there are none)."""
    predictions = jnp.asarray(predictions)
    eligible = jnp.asarray(true_labels) != target_class
    hits = (predictions == target_class) & eligible
    count = eligible.sum().astype(jnp.float32)
    return hits.sum().astype(jnp.float32) / jnp.where(count > 0, count, jnp.nan)
