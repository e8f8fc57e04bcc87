"""Resumable work that is not a sweep of independent trials.

Two patterns, each kept so that a killed run resumes where it stopped and computes
what an uninterrupted run does:

* `resume_steps`: a loop of steps `state, aux = step(state, s)` (training a
  generator, say) with evaluation points. At each point the state is saved (orbax)
  and the point's rows are committed as a chunk (`commit_chunks`); a rerun
  restores the newest intact saved state and repeats only the steps after it.
* `saved_unit` / `saved_arrays`: a unit of work (a clean model, one target's
  poisons) computed once and saved atomically; a rerun loads it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxpoison.results import atomic_write_bytes
from jaxpoison.sweep.chunks import checkpoint_manager, commit_chunks, newest_intact


def eval_points(steps: int, every: int) -> np.ndarray:
    """Steps after which the state is evaluated (and saved): 0, every, ..., and
    the last step."""
    return np.unique(np.append(np.arange(0, steps + 1, every), steps)).astype(np.int32)


def save_state(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
    """Saves `state` at `step` (kept if a killed run saved it already: a recomputed
    state is the same)."""
    if step not in manager.all_steps():
        # As numpy: in a multi-process run orbax refuses to save host-local
        # jax.Arrays (each process keeps its own copy of the state).
        host = jax.device_get(state)
        manager.save(step, args=ocp.args.StandardSave(host), force=True)
        manager.wait_until_finished()


def newest_saved_state(manager: ocp.CheckpointManager, upto: int, like: Any):
    """(step, state) of the newest intact state saved at or before `upto`; (0, None)
    when there is none. A damaged save is reported in one line and deleted."""
    step, state = newest_intact(manager, like, "saved state", upto)
    return (0, None) if step is None else (step, state)


def resume_steps(
    step: Callable[[Any, int], tuple[Any, Any]],
    state0: Any,
    points: np.ndarray,
    rows: Callable[[int, int, Any, list], list[dict]],
    workdir: str,
    state_dir: str = "state",
    desc: str = "evaluations",
) -> list[dict]:
    """Runs `state, aux = step(state, s)` for s = 0 .. points[-1] - 1, resumably.

    Args:
      step: one step; must depend only on its state and the index `s` (draws and
        keys made from `s`), so a resumed run computes what an uninterrupted one
        does. `aux` is fetched to the host.
      state0: the state before step 0 (a pytree of arrays).
      points: increasing steps at which the state is saved (to
        `workdir/state_dir/checkpoints`, the last two kept; step 0 is `state0` and
        not saved) and rows are made; `eval_points` makes them.
      rows: `rows(i, point, state, window)` -> the rows of point `i`, where
        `window` holds the aux of the steps since the previous point. Each
        point's rows are one committed chunk of the sweep (`commit_chunks`).
      workdir: the experiment's workdir.

    Returns:
      Every row, in point order.
    """
    manager = checkpoint_manager(os.path.join(workdir, state_dir))
    latest = {"step": 0, "state": state0}  # the newest state this process holds

    def advance(state, start: int, end: int):
        window = []
        for s in range(start, end):
            state, aux = step(state, s)
            window.append(jax.device_get(aux))
        return state, window

    def segment(i: int, chunk: dict) -> list[dict]:
        start, end = int(points[i - 1]) if i else 0, int(chunk["step"][0])
        state = latest["state"]
        if latest["step"] != start:  # resuming: from the newest saved state
            saved, state = newest_saved_state(manager, start, state0)
            state, _ = advance(state0 if state is None else state, saved, start)
        state, window = advance(state, start, end)
        if end:
            save_state(manager, end, state)
        latest.update(step=end, state=state)
        return rows(i, end, state, window)

    try:
        return commit_chunks(segment, {"step": points}, 1, workdir, desc=desc)
    finally:
        manager.close()


def saved_unit(
    path: str,
    make: Callable[[], Any],
    encode: Callable[[Any], bytes],
    decode: Callable[[bytes], Any],
) -> Any:
    """A unit of work computed once: `decode` of the file at `path` when it exists;
    otherwise `make()`, saved atomically as `encode(value)` before it is returned,
    so a rerun loads what a killed run finished (and a half-written file never
    exists)."""
    if os.path.exists(path):
        with open(path, "rb") as f:
            return decode(f.read())
    value = make()
    atomic_write_bytes(path, encode(value))
    return value


def _npz_bytes(arrays: dict) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _npz_arrays(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data)) as f:
        return dict(f)


def saved_arrays(path: str, make: Callable[[], dict]) -> dict[str, np.ndarray]:
    """`saved_unit` for a dict of arrays, saved as an .npz (no pickle)."""
    return saved_unit(path, make, _npz_bytes, _npz_arrays)
