"""Runs a vmapped trial function over an array of trial specs, chunk by chunk.

Each finished chunk's rows are written atomically to `workdir/chunks/NNNNN.jsonl`,
then an orbax checkpoint of the sweep state commits the chunk: step `k` in
`workdir/checkpoints/` says that chunks `0..k-1` are finished and holds the SHA-256
of each one's JSONL bytes. Re-running the same command with the same workdir
restores the latest checkpoint and resumes at chunk `k` (after a crash, a SIGKILL
or a TPU preemption); `results.jsonl` is assembled from all chunks at the end.

Why both: the JSONL rows are the results (readable, any nesting), the checkpoint
is the commit record. A chunk file written by a run that was killed before its
checkpoint landed, or a committed file that no longer matches its digest, is
recomputed, so a resumed run neither loses nor repeats a trial. A spec
fingerprint stored in `workdir/sweep.json` stops a resume with different trials.

With a `mesh` (`jaxpoison.sweep.sharding.trial_mesh()`), each chunk's trials are
split over its devices; the device count does not enter the fingerprint, so a sweep
may resume on a different number of devices. On several hosts every process gets
every row (`sharding.to_host` gathers them) and writes its own copy of the chunk
files into its (host-local) workdir; process 0 writes the checkpoint and broadcasts
it at start-up, and all hosts resume at the first chunk that any of them lacks.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from tqdm import tqdm

from jaxpoison.errors import Interrupted, UserInputError
from jaxpoison.results import read_jsonl, write_json, write_jsonl
from jaxpoison.sweep.sharding import pad_to_multiple, shard_trials

DIGEST_BYTES = 32  # SHA-256
STOP_AFTER_CHUNK = (
    "jaxpoison: stopping after this chunk, as every process will (signal again to "
    "stop now, losing the chunk)"
)


def _fingerprint(specs: dict[str, np.ndarray], chunk_size: int) -> str:
    h = hashlib.sha256(str(chunk_size).encode())
    for name in sorted(specs):
        h.update(name.encode())
        h.update(np.ascontiguousarray(specs[name]).tobytes())
    return h.hexdigest()[:16]


def _digest(path: str) -> np.ndarray:
    with open(path, "rb") as f:
        return np.frombuffer(hashlib.sha256(f.read()).digest(), np.uint8)


def empty_state(num_chunks: int, fingerprint: str = "0" * 16) -> dict[str, np.ndarray]:
    """Sweep state before any chunk: nothing done, no digests.

    The state carries the sweep's fingerprint too, so a checkpoint is never taken
    for another sweep's even when `sweep.json` is gone.
    """
    return {
        "chunks_done": np.zeros((), np.int32),
        "digests": np.zeros((num_chunks, DIGEST_BYTES), np.uint8),
        "fingerprint": np.frombuffer(bytes.fromhex(fingerprint), np.uint8).copy(),
    }


def checkpoint_manager(workdir: str) -> ocp.CheckpointManager:
    """An orbax CheckpointManager of `workdir/checkpoints` (last 2 kept) that
    involves this process alone.

    A sweep's is made on process 0 only (see `commit_chunks`); a step loop's
    (`steps.resume_steps`) on every process, each in its own workdir. Either way
    hosts never wait on each other's (host-local) checkpoint dirs.
    """
    me = jax.process_index()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=2,
        enable_async_checkpointing=False,  # the commit must land before moving on
        create=False,  # made below: orbax cannot with `active_processes`
        cleanup_tmp_directories=True,  # a save cut short by a kill is dropped
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}
        ),
    )
    path = os.path.abspath(os.path.join(workdir, "checkpoints"))
    os.makedirs(path, exist_ok=True)
    return ocp.CheckpointManager(path, options=options)


def restore_state(
    manager: ocp.CheckpointManager,
    num_chunks: int,
    fingerprint: str = "0" * 16,
    chunk_dir: str | None = None,
) -> dict:
    """The newest intact committed sweep state, or `empty_state` when there is none.

    A damaged step (broken metadata, truncated files) is reported in one line and
    deleted; the next older one is tried. When no step is intact but `chunk_dir`
    holds chunk files, the state is rebuilt from them (each was written atomically,
    so a file present is whole). A state of another sweep is an error.
    """
    state = empty_state(num_chunks, fingerprint)
    step, restored = newest_intact(manager, state, "checkpoint step")
    if step is not None:
        # np.array, not asarray: the state is updated in place as chunks finish.
        restored = jax.tree.map(np.array, restored)
        if restored["fingerprint"].tobytes().hex() != fingerprint:
            raise UserInputError(
                "the checkpoints in this workdir belong to a different sweep; use a "
                "new --workdir"
            )
        return restored
    if chunk_dir is not None:
        rebuilt = _state_from_chunk_files(state, chunk_dir)
        if int(rebuilt["chunks_done"]):
            print(
                f"jaxpoison: no intact checkpoint; rebuilt the sweep state from "
                f"{int(rebuilt['chunks_done'])} chunk files",
                file=sys.stderr,
            )
        return rebuilt
    return state


def newest_intact(
    manager: ocp.CheckpointManager, like: Any, what: str, upto: int | None = None
) -> tuple[int | None, Any]:
    """(step, state) of the newest orbax step (at or before `upto`) that restores
    against `like`'s structure; (None, None) when none does.

    A damaged step (broken metadata, truncated files) is reported in one line,
    naming it as `what`, and deleted; the next older one is tried. The state comes
    back as numpy arrays: orbax restores a jax.Array only with a sharding, which
    a host-local state in a multi-process run does not have.
    """
    template = jax.device_get(like)
    steps = [s for s in manager.all_steps() if upto is None or s <= upto]
    for step in sorted(steps, reverse=True):
        try:
            return step, manager.restore(step, args=ocp.args.StandardRestore(template))
        except Exception as e:  # noqa: BLE001 - any failure means a damaged step
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e)
            print(
                f"jaxpoison: {what} {step} is damaged ({reason}); falling back to "
                "an older one",
                file=sys.stderr,
            )
            manager.delete(step)
    return None, None


def _state_from_chunk_files(state: dict, chunk_dir: str) -> dict:
    """The state that commits every leading chunk file that parses as JSONL."""
    for i in range(len(state["digests"])):
        path = os.path.join(chunk_dir, f"{i:05d}.jsonl")
        try:
            read_jsonl(path)
        except (OSError, ValueError):
            break
        state["digests"][i] = _digest(path)
        state["chunks_done"] = np.asarray(i + 1, np.int32)
    return state


def remove_partial_files(*folders: str) -> None:
    """Deletes temporary `.part` files that a killed atomic write left behind."""
    for folder in folders:
        for path in glob.glob(os.path.join(glob.escape(folder), ".tmp-*.part")):
            with contextlib.suppress(OSError):
                os.unlink(path)


def _finished_chunks(state: dict, chunk_dir: str) -> int:
    """Leading chunks that are committed and whose files match their digests."""
    for i in range(int(state["chunks_done"])):
        path = os.path.join(chunk_dir, f"{i:05d}.jsonl")
        if not os.path.exists(path) or not np.array_equal(
            _digest(path), state["digests"][i]
        ):
            return i
    return int(state["chunks_done"])


@contextlib.contextmanager
def interrupted_at(progress: dict) -> Iterator[None]:
    """Annotates an interruption (Ctrl-C, SIGTERM) with the chunks committed so far."""
    try:
        yield
    except (KeyboardInterrupt, Interrupted) as e:
        e.progress = f"{progress['done']} of {progress['chunks']} chunks"
        raise


@contextlib.contextmanager
def signals_held(
    announce: str = "", force_on_second: bool = False
) -> Iterator[Callable[[], int]]:
    """Holds SIGINT and SIGTERM until the block ends, then delivers the first one
    (unless the block raised); yields a function that returns the first one held
    (0 for none), and prints `announce` on the first (process 0 only). With
    `force_on_second`, a second signal raises `Interrupted` at once.

    A commit (chunk file, checkpoint, progress count) is never cut in half, so the
    "N of M chunks" an interruption reports is what is on disk. In a multi-process
    sweep the whole loop holds them: a process interrupted in the middle of a chunk
    would leave the others blocked in the chunk's collectives, so all stop at a
    chunk's end that they agree on (`agreed_signal`).
    """
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: 0  # only the main thread may set handlers (and gets signals)
        return

    def hold(signum, frame):
        del frame
        if force_on_second and caught:
            raise Interrupted(signum)
        if announce and not caught and jax.process_index() == 0:
            print(announce, file=sys.stderr, flush=True)
        caught.append(signum)

    previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: caught[0] if caught else 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if caught:
        signal.raise_signal(caught[0])  # the restored handler raises here


def agreed_signal(local: int) -> int:
    """The signal every process stops for: the largest of their recorded signals
    (0: none, go on). A collective, so all processes call it at the same point."""
    return int(np.max(multihost_utils.process_allgather(np.int32(local))))


def run_chunks(
    trial_rows: Callable[[dict[str, np.ndarray]], list[dict]],
    specs: dict[str, np.ndarray],
    chunk_size: int,
    workdir: str,
    desc: str = "trials",
    mesh: jax.sharding.Mesh | None = None,
) -> list[dict]:
    """Runs `trial_rows` on consecutive chunks of `specs` and keeps every result.

    The lower layer of `jaxpoison.sweep.run_trials` (which experiments use); kept
    for trial functions that build their own rows.

    Args:
      trial_rows: maps a chunk of specs (dict of arrays with a leading trial axis of
        at most `chunk_size`) to one result row per trial. Must be deterministic in
        the chunk (seeds come from the specs), so a recomputed chunk gives the same
        rows.
      specs: dict of arrays, all with the same leading length (the trials).
      chunk_size: trials per chunk (a chunk is one vmapped program).
      workdir: output folder; `results.jsonl` holds every row when done.
      desc: label of the progress bar.
      mesh: optional 1-D "trials" mesh (`sharding.trial_mesh()`). When given, each
        chunk is padded to a multiple of `mesh.size` by repeating its last trial,
        `trial_rows` receives jax.Arrays sharded over the mesh's devices (instead
        of numpy arrays; `sharding.to_host` fetches them, across hosts too), and
        the rows of the padded trials are dropped.

    Returns:
      All rows, in spec order.
    """

    def rows_of(index: int, chunk: dict[str, np.ndarray]) -> list[dict]:
        del index
        n = len(next(iter(chunk.values())))
        if mesh is None:
            rows = trial_rows(chunk)
        else:
            padded, _ = pad_to_multiple(chunk, mesh.size)
            rows = trial_rows(shard_trials(padded, mesh))[:n]
        if len(rows) != n:
            raise ValueError(
                f"trial_rows returned {len(rows)} rows for a chunk of {n} trials"
            )
        return rows

    return commit_chunks(rows_of, specs, chunk_size, workdir, desc=desc)


def commit_chunks(
    chunk_rows: Callable[[int, dict[str, np.ndarray]], list[dict]],
    specs: dict[str, np.ndarray],
    chunk_size: int,
    workdir: str,
    desc: str = "trials",
) -> list[dict]:
    """The resume loop: `chunk_rows(i, chunk)` for each unfinished chunk `i`.

    `chunk` holds numpy slices of `specs`; `chunk_rows` may return any number of
    rows (a trial may give several). Each chunk's rows are written atomically and
    committed by an orbax checkpoint before the next chunk starts.
    """
    lengths = {len(v) for v in specs.values()}
    if len(lengths) != 1:
        raise UserInputError(f"trial specs have different lengths: {sorted(lengths)}")
    if chunk_size < 1:
        raise UserInputError(f"chunk_size must be at least 1, got {chunk_size}")
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
    starts = list(range(0, n, chunk_size))
    write_json(
        meta_path,
        {
            "fingerprint": fingerprint,
            "trials": n,
            "chunk_size": chunk_size,
            "chunks": len(starts),
        },
    )
    # Process 0 keeps the checkpoint; every host checks its own chunk files
    # against process 0's digests.
    remove_partial_files(workdir, chunk_dir)
    manager = checkpoint_manager(workdir) if jax.process_index() == 0 else None
    state = empty_state(len(starts), fingerprint)
    if manager is not None:
        state = restore_state(manager, len(starts), fingerprint, chunk_dir)
    multihost = jax.process_count() > 1
    if multihost:
        state = jax.tree.map(np.array, multihost_utils.broadcast_one_to_all(state))
    first = _finished_chunks(state, chunk_dir)
    if multihost:
        # Chunks are collective programs: every host resumes at the same chunk,
        # the earliest any of them lacks (a kill may land between process 0's
        # commit and another host's file; recomputing gives the same rows).
        first = int(np.min(multihost_utils.process_allgather(np.int32(first))))
    for step in manager.all_steps() if manager is not None else ():
        if step > first:  # commits past a bad chunk are void
            manager.delete(step)
    rows: list[dict] = []
    for i in range(first):
        rows.extend(read_jsonl(os.path.join(chunk_dir, f"{i:05d}.jsonl")))
    # `initial` keeps resumed trials out of the rate, so the ETA is honest.
    done = min(first * chunk_size, n)
    progress = {"done": first, "chunks": len(starts)}
    with (
        tqdm(total=n, initial=done, desc=desc, unit="trial") as bar,
        interrupted_at(progress),
        # One process stops at once; several stop only at a chunk's end, together.
        signals_held(STOP_AFTER_CHUNK, force_on_second=True)
        if multihost
        else contextlib.nullcontext() as held,
    ):
        for i in range(first, len(starts)):
            start = starts[i]
            chunk = {k: v[start : start + chunk_size] for k, v in specs.items()}
            chunk_rows_i = chunk_rows(i, chunk)
            path = os.path.join(chunk_dir, f"{i:05d}.jsonl")
            with signals_held():
                write_jsonl(path, chunk_rows_i)
                state["digests"][i] = _digest(path)
                state["chunks_done"] = np.asarray(i + 1, np.int32)
                if manager is not None:
                    manager.save(i + 1, args=ocp.args.StandardSave(state), force=True)
                    manager.wait_until_finished()
                rows.extend(chunk_rows_i)
                progress["done"] = i + 1
            bar.update(min(chunk_size, n - start))
            if multihost and (signum := agreed_signal(held())):
                raise Interrupted(signum)
    if manager is not None:
        manager.close()
    write_jsonl(os.path.join(workdir, "results.jsonl"), rows)
    return rows
