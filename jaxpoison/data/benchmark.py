"""The poisoning benchmark's CIFAR-10 transfer-learning setups (Schwarzschild et
al. 2021, "Just How Toxic is Data Poisoning?"): its 100 setups (a target test
image, 25 base training images of another class; shipped as an asset) and the
training rows its victims read (its PoisonedDataset)."""

from __future__ import annotations

import json
import os

import numpy as np

from jaxpoison.errors import UserInputError

SETUPS = os.path.normpath(
    os.path.join(
        os.path.dirname(__file__),
        "..",
        "assets",
        "benchmark_cifar10_transfer_learning.json",
    )
)


def load_setups(path: str, num_setups: int) -> dict[str, np.ndarray]:
    """The first `num_setups` setups of `path` (the shipped file when empty) as
    arrays: setup, target_index, target_class, base_class (S,), base_indices (S, B)."""
    path = path or SETUPS
    if not os.path.isfile(path):
        raise UserInputError(f"setups file not found: {path}")
    with open(path) as f:
        setups = json.load(f)
    if not 1 <= num_setups <= len(setups):
        raise UserInputError(f"num_setups={num_setups}: the file has {len(setups)}")
    setups = setups[:num_setups]
    return {
        "setup": np.arange(num_setups, dtype=np.int32),
        "target_index": np.array([s["target index"] for s in setups], np.int32),
        "target_class": np.array([s["target class"] for s in setups], np.int32),
        "base_class": np.array([s["base class"] for s in setups], np.int32),
        "base_indices": np.array([s["base indices"] for s in setups], np.int32),
    }


def victim_rows(
    train_labels: np.ndarray, base_class: int, bases: np.ndarray, per_class: int
) -> np.ndarray:
    """The benchmark's PoisonedDataset rows: first `per_class` per class without the
    bases; the base class keeps its first `per_class - len(bases)` plus the bases."""
    rows = []
    for c in range(int(train_labels.max()) + 1):
        idx = np.setdiff1d(np.flatnonzero(train_labels == c), bases)
        keep = per_class - len(bases) if c == base_class else per_class
        rows.append(idx[:keep])
    return np.sort(np.concatenate([*rows, bases]))
