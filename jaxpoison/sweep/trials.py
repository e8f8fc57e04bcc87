"""A trial family as two functions, and the one engine that runs every experiment.

A `Trial` is what an experiment declares; `run_trials` does the rest:

    trial = Trial(run=victims_for_targets, row=row_of_victim)
    rows = run_trials(trial, shared, specs, chunk_size=50, workdir=workdir, mesh=mesh)

- `run(shared, specs) -> outputs` is pure and jit-compatible. `shared` is a pytree of
  arrays every trial reads (clean data, pretrained weights); `specs` is a dict of
  arrays with a leading trial axis (one chunk of trials); every output leaf has the
  trial axis first. Only numeric and boolean specs reach `run`; all of them reach
  `row`.
- `row(spec, out) -> dict | list[dict]` runs on the host for ONE trial: `spec` and
  `out` hold that trial's numpy slices. A trial may give several rows (one per
  victim it trains).
- `save(chunk, specs, outputs, workdir)` (optional) writes a chunk's artefacts
  (poisons, per-chunk arrays) before its rows are committed, so a committed chunk
  always has them.

`run_trials` jits `run` once, splits each chunk over the devices of `mesh` with a
`shard_map` derived from the arguments (shared replicated, specs and outputs split
along the trial axis; a chunk is padded to a multiple of the device count by
repeating its last trial, whose rows are dropped), and hands the rows to
`commit_chunks`, which writes each chunk atomically, commits it with an orbax
checkpoint, resumes after a crash at the first unfinished chunk and shows progress
with an ETA. One device (or no mesh) runs plain `jit(run)`: the same program as
before the mesh existed, so one-device results stay bit-for-bit the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh

from jaxpoison.errors import UserInputError
from jaxpoison.sweep.chunks import commit_chunks
from jaxpoison.sweep.sharding import (
    pad_to_multiple,
    per_device,
    replicate,
    shard_trials,
    to_host,
)

Row = dict[str, Any]


class Trial(NamedTuple):
    """A family of trials: device work, host rows and optional chunk artefacts."""

    run: Callable[[Any, dict[str, jax.Array]], Any]
    row: Callable[[dict[str, np.ndarray], Any], Row | list[Row]]
    save: Callable[[int, dict[str, np.ndarray], Any, str], None] | None = None


def device_specs(specs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The specs `run` receives: numeric and boolean arrays (not strings)."""
    return {
        k: v
        for k, v in specs.items()
        if np.issubdtype(np.asarray(v).dtype, np.number)
        or np.asarray(v).dtype == np.bool_
    }


def trial_slice(tree: Any, i: int) -> Any:
    """Trial `i` of a pytree whose leaves have the trial axis first."""
    return jax.tree.map(lambda x: x[i], tree)


def rows_of_chunk(
    row: Callable, specs: dict[str, np.ndarray], outputs: Any, n: int
) -> list[Row]:
    """`row` applied to each of the first `n` trials; lists of rows are flattened."""
    rows: list[Row] = []
    for i in range(n):
        got = row(trial_slice(specs, i), trial_slice(outputs, i))
        rows.extend(got if isinstance(got, list) else [got])
    return rows


def check_finite(outputs: Any, chunk: dict[str, np.ndarray], first: int) -> None:
    """Stops the sweep, naming the trial, if any float output is NaN or infinite.

    A diverged victim or crafter (too large a learning rate, NaN inputs) would
    otherwise be averaged into rates and means as plausible numbers. Nothing of the
    chunk is committed, so the rows on disk stay trustworthy; fix the setting (or
    the trial's inputs) and rerun. Trials that may legitimately produce NaN must
    encode it (e.g. a `diverged` flag) rather than return it.
    """
    leaves = jax.tree_util.tree_leaves_with_path(outputs)
    for path, leaf in leaves:
        leaf = np.asarray(leaf)
        if not np.issubdtype(leaf.dtype, np.inexact) or leaf.ndim == 0:
            continue
        bad = ~np.isfinite(leaf.reshape(len(leaf), -1)).all(axis=1)
        if bad.any():
            i = int(np.argmax(bad))
            scalars = {
                k: v[i].item()
                for k, v in chunk.items()
                if np.ndim(v) == 1 and np.asarray(v).dtype.kind in "biuf"
            }
            spec = ", ".join(f"{k}={v}" for k, v in scalars.items())
            raise UserInputError(
                f"trial {first + i} ({spec}) gave a non-finite output "
                f"{jax.tree_util.keystr(path)}: it diverged or read NaN; nothing of "
                "its chunk was kept"
            )


def compile_trials(
    run: Callable, mesh: Mesh | None
) -> Callable[[Any, dict[str, Any]], Any]:
    """`run` jitted once; over a mesh of several devices, one slice per device.

    Each device runs `run` unchanged on its own trials (a `shard_map`): a `lax.map`
    or while loop over the trial axis is not split by XLA's sharding propagation
    (`benchmarks/per_device.py`). Trials never communicate, so no collective.
    """
    if mesh is None or mesh.size == 1:
        return jax.jit(run)
    return jax.jit(per_device(run, mesh, trial_args=(False, True)))


def run_trials(
    trial: Trial,
    shared: Any,
    specs: dict[str, np.ndarray],
    *,
    chunk_size: int,
    workdir: str,
    mesh: Mesh | None = None,
    desc: str = "trials",
) -> list[Row]:
    """Runs every trial of `specs` in chunks; resumable; returns all rows in order.

    Args:
      trial: the trial family (`Trial`).
      shared: pytree of arrays every trial reads; put on the devices once.
      specs: dict of arrays with the same leading (trial) length. Must determine the
        trials completely (seeds included): a recomputed chunk gives the same rows.
      chunk_size: trials per chunk (one compiled program per chunk shape).
      workdir: the sweep's folder (`chunks/`, `checkpoints/`, `sweep.json`,
        `results.jsonl`).
      mesh: a 1-D "trials" mesh (`sharding.trial_mesh()`); None = default device.
      desc: label of the progress bar.
    """
    fn = compile_trials(trial.run, mesh)
    devices = 1 if mesh is None else mesh.size
    shared = replicate(shared, mesh) if devices > 1 else jax.device_put(shared)

    def chunk_rows(index: int, chunk: dict[str, np.ndarray]) -> list[Row]:
        n = len(next(iter(chunk.values())))
        padded, _ = pad_to_multiple(device_specs(chunk), devices)
        inputs = shard_trials(padded, mesh) if devices > 1 else padded
        outputs = jax.tree.map(lambda x: x[:n], to_host(fn(shared, inputs)))
        check_finite(outputs, chunk, index * chunk_size)
        if trial.save is not None:
            trial.save(index, chunk, outputs, workdir)
        return rows_of_chunk(trial.row, chunk, outputs, n)

    return commit_chunks(chunk_rows, specs, chunk_size, workdir, desc=desc)
