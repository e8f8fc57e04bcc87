"""A split as in-memory arrays, and deterministic subsets and splits of it.

CIFAR-scale data fits in memory, so a split is loaded once into uint8 arrays and
every trial indexes into the same arrays; trials never copy the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from jaxpoison.errors import UserInputError


class ImageData(NamedTuple):
    """A split as arrays.

    Attributes:
      images: uint8 (N, H, W, C).
      labels: int32 (N,).
      class_names: one name per class id.
      boxes: float32 (N, 4) normalised (ymin, xmin, ymax, xmax), or None.
      ids: int64 (N,) index of each example in the original split order.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    boxes: np.ndarray | None = None
    ids: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def example_ids(self) -> np.ndarray:
        """`ids`, or the rows themselves when there are none (the original split)."""
        return self.ids if self.ids is not None else np.arange(len(self.labels))

    def take(self, indices: np.ndarray) -> ImageData:
        """The examples at `indices`, in that order."""
        indices = np.asarray(indices)
        return ImageData(
            self.images[indices],
            self.labels[indices],
            self.class_names,
            None if self.boxes is None else self.boxes[indices],
            self.example_ids[indices],
        )


def check_classes(classes: Sequence[int] | int, num_classes: int, what: str) -> None:
    """Raises a one-line UserInputError if a class id is out of range."""
    for c in np.atleast_1d(classes):
        if not 0 <= int(c) < num_classes:
            raise UserInputError(
                f"{what} {int(c)} is out of range: classes are 0..{num_classes - 1}"
            )


def check_choice(value: str, known: Sequence[str], what: str) -> None:
    """Raises a one-line UserInputError if `value` is not one of `known`."""
    if value not in known:
        raise UserInputError(f"unknown {what} {value!r}; known: {', '.join(known)}")


def class_index(name: str, names: Sequence[str], what: str) -> int:
    """The index of class `name` in `names`; a one-line UserInputError if absent."""
    if name not in names:
        raise UserInputError(f"{what} {name!r} unknown; classes: {', '.join(names)}")
    return list(names).index(name)


def check_distinct(classes: Sequence, what: str) -> None:
    """Raises a one-line UserInputError if two of `classes` are the same."""
    if len(set(classes)) != len(classes):
        raise UserInputError(f"{what} must differ, got {tuple(classes)}")


def first_k_per_class(
    labels: np.ndarray,
    k: int,
    classes: Sequence[int] | None = None,
    class_order: bool = False,
) -> np.ndarray:
    """Indices of the first `k` examples of each class, in original order (or
    class by class with `class_order`).

    The poisoning benchmark's transfer-learning victim trains on the first 250 CIFAR-10
    training images per class (Schwarzschild et al. 2021); MetaPoison's
    truncated_cifar10 sorts such a subset by label.
    """
    labels = np.asarray(labels)
    num_classes = int(labels.max()) + 1
    classes = range(num_classes) if classes is None else classes
    check_classes(classes, num_classes, "class")
    picked = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        if len(idx) < k:
            raise UserInputError(f"class {c} has {len(idx)} examples, fewer than {k}")
        picked.append(idx[:k])
    picked = np.concatenate(picked)
    return picked if class_order else np.sort(picked)


def class_pair(
    labels: np.ndarray, pair: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the examples of two classes and their labels remapped to 0/1."""
    labels = np.asarray(labels)
    check_classes(pair, int(labels.max()) + 1, "class")
    idx = np.flatnonzero((labels == pair[0]) | (labels == pair[1]))
    return idx, (labels[idx] == pair[1]).astype(np.int32)


def split_fractions(n: int, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Partitions `range(n)` at random into parts of the given fractions.

    Sizes are floor(f * n) for all parts but the last, which takes the rest, so
    nothing is dropped; e.g. Truong et al.'s 76/19/5 poison/clean/adversarial split,
    then 80/20 train/val within a part.
    """
    fractions = np.asarray(fractions, np.float64)
    if np.any(fractions <= 0) or not np.isclose(fractions.sum(), 1.0):
        raise UserInputError(
            f"split fractions {list(fractions)} must be >0 and sum to 1"
        )
    perm = np.random.default_rng(seed).permutation(n)
    cuts = np.floor(np.cumsum(fractions[:-1]) * n).astype(int)
    return [np.sort(part) for part in np.split(perm, cuts)]


def nested_split(
    n: int, outer: Sequence[float], inner: Sequence[float], seed: int
) -> list[list[np.ndarray]]:
    """`split_fractions` then each part split again (e.g. 76/19/5 then 80/20)."""
    parts = split_fractions(n, outer, seed)
    return [
        [part[i] for i in split_fractions(len(part), inner, seed + 1 + j)]
        for j, part in enumerate(parts)
    ]
