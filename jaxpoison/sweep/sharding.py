"""Trials over many devices: a 1-D "trials" mesh and the puts that use it.

A chunk of trials is one vmapped program; sharding the chunk's leading (trial) axis
over a mesh of every device, on every host, makes XLA partition that program so each
device runs its share of the trials and nothing else (trials never communicate). The
shared inputs (clean data, pretrained weights) are closed over or `replicate`d.

    mesh = trial_mesh()
    padded, n_real = pad_to_multiple(chunk, mesh.size)
    out = jitted_trials(**shard_trials(padded, mesh))  # out sharded like the input
    rows = to_host(out)[:n_real]  # drop the padded trials

`run_chunks(..., mesh=mesh)` does the padding, sharding and dropping per chunk.

Multi-host (after `jax.distributed.initialize()`): every process must call these with
the same full (global) arrays, e.g. specs made from the config's seed; `device_put`
checks that they agree and each process keeps only its own devices' slices. Results
sharded over other hosts' devices are not addressable: fetch them with `to_host`.

The mesh axis is `AxisType.Auto` on purpose: `jax.make_mesh` defaults to Explicit
axes in jax 0.10, under which a vmapped convolution over a sharded trial axis fails
to trace (`ShardingTypeError: This reshape is not supported ...`). Auto lets XLA's
sharding propagation partition any trial function unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpoison.errors import UserInputError

TRIALS = "trials"


def trial_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named "trials" over `devices` (default: all global devices)."""
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh(
        (len(devices),), (TRIALS,), axis_types=(AxisType.Auto,), devices=devices
    )


def per_device(fn: Callable, mesh: Mesh, trial_args: Sequence[bool]) -> Callable:
    """`fn` run by every device of `mesh` on its own slice of the trials.

    A `shard_map` with the trial axis of the arguments flagged in `trial_args` (and
    of every output) split over "trials", the other arguments replicated: each device
    runs `fn` unchanged on its local trials. Use it for trial functions whose inner
    loops index the trial axis (a `lax.map` over trials, a while loop per trial):
    XLA's sharding propagation cannot split those and replicates the whole chunk on
    every device (`python benchmarks/per_device.py` compares: one device, the same
    jit auto-partitioned, and per_device). Trials never communicate, so no
    collective is needed.
    """
    specs = tuple(P(TRIALS) if t else P() for t in trial_args)
    return jax.shard_map(
        fn, mesh=mesh, in_specs=specs, out_specs=P(TRIALS), check_vma=False
    )


def shard_trials(tree: Any, mesh: Mesh) -> Any:
    """Puts every array leaf on `mesh`, its leading (trial) axis split over "trials".

    Pads nothing: every leaf's leading length must be a multiple of `mesh.size` (use
    `pad_to_multiple` first; `run_chunks(mesh=...)` does). Scalars are an error.
    """
    sharding = NamedSharding(mesh, P(TRIALS))
    for leaf in jax.tree.leaves(tree):
        shape = np.shape(leaf)
        if not shape or shape[0] % mesh.size:
            raise UserInputError(
                f"a trial array of shape {shape} cannot be split over {mesh.size} "
                "devices: its leading (trial) length must be a multiple of the "
                "device count (see pad_to_multiple)"
            )
    return jax.device_put(tree, sharding)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Puts every array leaf on every device of `mesh` (shared inputs)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def pad_to_multiple(
    specs: Mapping[str, np.ndarray], k: int
) -> tuple[dict[str, np.ndarray], int]:
    """Repeats the last trial until the number of trials is a multiple of `k`.

    Returns (padded specs, number of real trials); the caller drops the rows of the
    padded trials (results `[:n_real]`). Repeating a real trial keeps the padding
    valid input for any trial function.
    """
    if k < 1:
        raise UserInputError(f"cannot pad to a multiple of {k}")
    lengths = {len(v) for v in specs.values()}
    if len(lengths) > 1:
        raise UserInputError(f"trial specs have different lengths: {sorted(lengths)}")
    n = lengths.pop() if lengths else 0
    arrays = {name: np.asarray(v) for name, v in specs.items()}
    extra = -n % k
    if n == 0 or extra == 0:
        return arrays, n
    padded = {
        name: np.concatenate([a, np.repeat(a[-1:], extra, axis=0)])
        for name, a in arrays.items()
    }
    return padded, n


def to_host(tree: Any) -> Any:
    """numpy copies of every leaf, gathering ones sharded over other hosts' devices."""

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(get, tree)
