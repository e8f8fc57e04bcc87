"""Seeded subsets and protocol splits of a labelled set, as row indices.

Built on `arrays.split_fractions` (random parts of given fractions); every split
is a pure function of the labels and a seed, so a resumed run splits the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxpoison.data.arrays import split_fractions


def random_subset(n: int, size: int, seed: int) -> np.ndarray:
    """Sorted rows of a seeded random subset of `size` of `range(n)` (all rows
    when `size` is 0 or at least `n`)."""
    if not size or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def backdoor_protocol_split(
    labels: np.ndarray,
    fractions: Sequence[float],
    inner: Sequence[float],
    poison_class: int | None,
    seed: int,
) -> dict[str, np.ndarray]:
    """Truong et al. 2020's split (Sec. 4), rows of `labels`.

    `fractions` (76/19/5) part the rows into poison-set / clean-set / adversarial
    test; the poison-set and the clean-set are each split again by `inner`
    (80/20) into train / val (seeds `seed + 1`, `seed + 2`). The adversarial
    test's first row is held out ("held_out": the low-variance trigger's image
    not in the training data) and not tested; the adversarial test keeps no
    image of the poison class (`poison_class` None: every class, for grids whose
    poison class varies; their ASR counts only source-class images).

    Returns:
      {"poison_train", "poison_val", "clean_train", "clean_val", "held_out",
      "adversarial"}: sorted row indices, pairwise disjoint.
    """
    poison, clean, adv = split_fractions(len(labels), fractions, seed)
    out = {}
    for name, part, offset in (("poison", poison, 1), ("clean", clean, 2)):
        train, val = split_fractions(len(part), inner, seed + offset)
        out[f"{name}_train"], out[f"{name}_val"] = part[train], part[val]
    out["held_out"] = adv[:1]
    rest = adv[1:]
    out["adversarial"] = (
        rest if poison_class is None else rest[labels[rest] != poison_class]
    )
    return out
