"""Stratified splits: every class in each part, in proportion to its size.

A small data set with rare classes (the road signs' 76 stop signs among 877
images) split at random can leave a class nearly absent from one side; splitting
each class on its own keeps the class balance of the whole in both parts.
"""

from __future__ import annotations

import numpy as np


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows): per class, a seeded round(test_fraction * n_c) to
    test (halves round up), the rest to train; both sorted."""
    rng = np.random.default_rng(seed)
    train_rows, test_rows = [], []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        k = int(np.floor(test_fraction * len(rows) + 0.5))
        test_rows.append(rows[:k])
        train_rows.append(rows[k:])
    return np.sort(np.concatenate(train_rows)), np.sort(np.concatenate(test_rows))


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """About `size` sorted rows, each class in proportion (at least one row of
    each), drawn without replacement (seeded)."""
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        k = max(1, int(round(size * len(rows) / len(labels))))
        keep.append(rng.choice(rows, min(k, len(rows)), replace=False))
    return np.sort(np.concatenate(keep))
