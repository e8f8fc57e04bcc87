"""Trial seeds and keys: one scheme for every experiment.

A trial's randomness comes from an integer seed stored in its spec (so rows and
resumes are reproducible from `results.jsonl` alone), turned into a PRNG key on the
device. Seeds are laid out from the config's `seed`:

    trial_seeds(seed, n)                  -> seed + i           (most experiments)
    trial_seeds(seed, n, stride=1000)     -> 1000 * seed + i    (one block per seed)
    trial_seeds(seed, n, offset=10_000)   -> seed + 10_000 + i  (a second stream)

so two streams of one experiment (crafting and victims, say) never share a seed as
long as their offsets are further apart than the trial count. Keys for named cells
(a grid cell that must keep its randomness when other cells are added) come from a
CRC-32 of the cell's name (`named_key`).
"""

from __future__ import annotations

import zlib

import jax
import numpy as np


def trial_seeds(seed: int, n: int, *, stride: int = 1, offset: int = 0) -> np.ndarray:
    """`stride * seed + offset + i` for trials i = 0..n-1, as int32."""
    return (np.arange(n) + stride * int(seed) + offset).astype(np.int32)


def trial_keys(seeds: jax.Array) -> jax.Array:
    """One PRNG key per seed (traceable: seeds may be a chunk's spec)."""
    return jax.vmap(jax.random.key)(seeds)


def named_key(*parts: object) -> jax.Array:
    """A key from a cell's name, e.g. `named_key(cell, seed, "victim")`."""
    return jax.random.key(zlib.crc32("|".join(str(p) for p in parts).encode()))


def key_chain(key: jax.Array, n: int) -> jax.Array:
    """k_0..k_{n-1} of `key, k_s = split(key)` repeated: step s's key, as a host
    loop that splits once per step draws it (so a resumed loop can index it)."""

    def body(key, _):
        key, k = jax.random.split(key)
        return key, k

    return jax.lax.scan(body, key, None, length=n)[1]
