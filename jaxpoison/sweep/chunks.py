"""Runs a vmapped trial function over an array of trial specs, chunk by chunk.

Each finished chunk's rows are written atomically to `workdir/chunks/NNNNN.jsonl`;
a rerun with the same workdir skips finished chunks (resume after interruption or
preemption) and `results.jsonl` is assembled from all chunks at the end. A spec
fingerprint stored in `workdir/sweep.json` stops a resume with different trials.

With a `mesh` (`jaxpoison.sweep.sharding.trial_mesh()`), each chunk's trials are
split over its devices; the device count does not enter the fingerprint, so a sweep
may resume on a different number of devices.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable

import jax
import numpy as np
from tqdm import tqdm

from jaxpoison.errors import UserInputError
from jaxpoison.results import read_jsonl, write_json, write_jsonl
from jaxpoison.sweep.sharding import pad_to_multiple, shard_trials


def _fingerprint(specs: dict[str, np.ndarray], chunk_size: int) -> str:
    h = hashlib.sha256(str(chunk_size).encode())
    for name in sorted(specs):
        h.update(name.encode())
        h.update(np.ascontiguousarray(specs[name]).tobytes())
    return h.hexdigest()[:16]


def run_chunks(
    trial_rows: Callable[[dict[str, np.ndarray]], list[dict]],
    specs: dict[str, np.ndarray],
    chunk_size: int,
    workdir: str,
    desc: str = "trials",
    mesh: jax.sharding.Mesh | None = None,
) -> list[dict]:
    """Runs `trial_rows` on consecutive chunks of `specs` and keeps every result.

    Args:
      trial_rows: maps a chunk of specs (dict of arrays with a leading trial axis of
        at most `chunk_size`) to one result row per trial. Typically a jitted, vmapped
        trial function plus conversion to rows.
      specs: dict of arrays, all with the same leading length (the trials).
      chunk_size: trials per chunk (a chunk is one vmapped program).
      workdir: output folder; `results.jsonl` holds every row when done.
      mesh: optional 1-D "trials" mesh (`sharding.trial_mesh()`). When given, each
        chunk is padded to a multiple of `mesh.size` by repeating its last trial,
        `trial_rows` receives jax.Arrays sharded over the mesh's devices (instead
        of numpy arrays; `sharding.to_host` fetches them, across hosts too), and
        the rows of the padded trials are dropped. Pick a `chunk_size` that is a
        multiple of the device count to waste nothing.

    Returns:
      All rows, in spec order.
    """
    lengths = {len(v) for v in specs.values()}
    if len(lengths) != 1:
        raise UserInputError(f"trial specs have different lengths: {sorted(lengths)}")
    (n,) = lengths
    chunk_dir = os.path.join(workdir, "chunks")
    os.makedirs(chunk_dir, exist_ok=True)
    meta_path = os.path.join(workdir, "sweep.json")
    fingerprint = _fingerprint(specs, chunk_size)
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            if json.load(f).get("fingerprint") != fingerprint:
                raise UserInputError(
                    f"{workdir} holds a different sweep; use a new --workdir"
                )
    write_json(
        meta_path, {"fingerprint": fingerprint, "trials": n, "chunk_size": chunk_size}
    )
    starts = range(0, n, chunk_size)
    rows: list[dict] = []
    with tqdm(total=n, desc=desc, unit="trial") as bar:
        for i, start in enumerate(starts):
            path = os.path.join(chunk_dir, f"{i:05d}.jsonl")
            if os.path.exists(path):
                chunk_rows = read_jsonl(path)
            else:
                chunk = {k: v[start : start + chunk_size] for k, v in specs.items()}
                if mesh is None:
                    chunk_rows = trial_rows(chunk)
                else:
                    padded, n_real = pad_to_multiple(chunk, mesh.size)
                    chunk_rows = trial_rows(shard_trials(padded, mesh))[:n_real]
                write_jsonl(path, chunk_rows)
            rows.extend(chunk_rows)
            bar.update(len(chunk_rows))
    write_jsonl(os.path.join(workdir, "results.jsonl"), rows)
    return rows
