"""Multi-process start-up: a cluster's hosts (`--distributed`) or N processes on
this machine (`--processes N`).

On a Cloud TPU VM slice (`launch/tpu_vm.sh run`), the same command runs on every
worker; `jax.distributed.initialize()` finds the coordinator, the number of processes
and this process's id from the TPU environment (also Slurm and Open MPI), after which
`jax.devices()` lists every host's devices and a `trial_mesh()` spans them all. It
must run before anything else touches JAX devices, so the CLI calls it first.

On one CPU machine, `run_local_processes` starts the same command N times, each
process pinned to its share of the cores and joined to the others through
`jax.distributed` (a coordinator on localhost, gloo collectives), so a sweep's
trials are split over processes instead of over devices of one process: one
single-device process per core trains victims 1.03-1.32x faster than one process
with a device per core (`python benchmarks/victim_speed.py`, its "jax processes"
rows), but each process repeats the work outside the trials, so whole experiments
ran slower than one process (README, Speed). Process 0 is an ordinary run
in the workdir; every other process, like a host of a pod with its own disk, keeps
its own copy in a scratch folder that starts as a copy of the workdir (so every
process resumes at the same point) and is deleted at the end.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence

import jax

MAX_CPU_DEVICES = 8

# Set by `run_local_processes` in the environment of each process it starts.
COORDINATOR_ENV = "JAXPOISON_COORDINATOR"
PROCESS_ID_ENV = "JAXPOISON_PROCESS_ID"
NUM_PROCESSES_ENV = "JAXPOISON_NUM_PROCESSES"
WORKDIR_ENV = "JAXPOISON_PROCESS_WORKDIR"  # processes other than 0: their own copy
# How long the other processes get to stop after one fails, before they are killed
# (one may be blocked in a collective that waits for the failed one).
STOP_GRACE_SECONDS = 20.0
SETTLE_SECONDS = 2.0  # after a failure, before the others get SIGTERM
SCRATCH_PREFIX = "jaxpoison-processes-"  # + the launcher's pid: its scratch folder


def maybe_initialize(enabled: bool) -> tuple[int, int]:
    """Joins the multi-host JAX cluster when `enabled`; prints where this process is.

    Returns:
      (process index, process count); (0, 1) when not `enabled` and not started by
      `run_local_processes`, without touching JAX's backends (so flags such as
      `jax_num_cpu_devices` may still be set).
    """
    local = local_process()
    if not enabled and local is None:
        return 0, 1
    if not jax.distributed.is_initialized():
        if local is None:
            jax.distributed.initialize()
        else:
            jax.distributed.initialize(
                os.environ[COORDINATOR_ENV],
                num_processes=local[1],
                process_id=local[0],
            )
    print(
        f"jax.distributed: process {jax.process_index()} of {jax.process_count()}, "
        f"{jax.local_device_count()} local of {jax.device_count()} global "
        f"{jax.default_backend()} devices",
        flush=True,
    )
    return jax.process_index(), jax.process_count()


@contextlib.contextmanager
def failures_exit_at_once() -> Iterator[None]:
    """In a multi-process run, a process that fails (an error, an interruption)
    exits at once, its output flushed, skipping JAX's exit handler.

    That handler waits in a shutdown barrier for every process, and another process
    may be blocked in a collective that waits for this one, so both would hang (the
    launcher or the cluster stops the others). A single process is unaffected.
    """
    try:
        yield
    except SystemExit as e:
        if e.code in (None, 0) or not jax.distributed.is_initialized():
            raise
        _exit_now(e.code if isinstance(e.code, int) else 1)
    except BaseException:
        if not jax.distributed.is_initialized():
            raise
        traceback.print_exc()
        _exit_now(1)


def _exit_now(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cpu_cores() -> int:
    """The number of CPU cores this process may run on."""
    return len(allowed_cores())


def split_cpu_into_devices(count: int = 0) -> int:
    """Makes JAX's CPU backend one device per core (`count` = 0: up to 8 cores).

    XLA:CPU runs many convolutions on one thread (on this project's 2-core machines
    ResNet-20's 32- and 64-channel convolutions take the same time on one core as
    on two), so one device per core, with trials split over a mesh of them, is how
    a CPU host uses all its cores (`python benchmarks/per_device.py`: 1.4x on 2
    cores; `python benchmarks/crafting.py`: per-core crafting 1.4-1.8x one device).
    Must run before JAX's backends start; does nothing when XLA_FLAGS already sets
    `--xla_force_host_platform_device_count`, and affects only the CPU backend.

    Returns:
      the number of CPU devices requested (0 when left to XLA_FLAGS).
    """
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return 0
    count = count or min(cpu_cores(), MAX_CPU_DEVICES)
    jax.config.update("jax_num_cpu_devices", count)
    return count


def local_process() -> tuple[int, int] | None:
    """(process id, process count) of a process `run_local_processes` started;
    None for any other process."""
    if PROCESS_ID_ENV not in os.environ:
        return None
    return int(os.environ[PROCESS_ID_ENV]), int(os.environ[NUM_PROCESSES_ENV])


def allowed_cores() -> list[int]:
    """The ids of the cores this process may run on, in order."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux: no affinity, every core
        return list(range(os.cpu_count() or 1))


def core_groups(cores: Sequence[int], count: int) -> list[list[int]]:
    """`cores` dealt into `count` contiguous groups whose sizes differ by at most 1
    (the larger first): neighbouring ids tend to share caches."""
    if not 1 <= count <= len(cores):
        raise ValueError(f"cannot split {len(cores)} cores into {count} groups")
    size, extra = divmod(len(cores), count)
    groups, start = [], 0
    for i in range(count):
        end = start + size + (i < extra)
        groups.append(list(cores[start:end]))
        start = end
    return groups


def mirror_workdir(workdir: str, copy: str) -> None:
    """Makes `copy` hold what `workdir` holds now (nothing if it does not exist yet),
    without its lock file: another process's starting point for resuming."""
    shutil.rmtree(copy, ignore_errors=True)
    if os.path.isdir(workdir):
        from jaxpoison.sweep.workdir import LOCK_FILE

        top = os.path.abspath(workdir)
        shutil.copytree(
            workdir,
            copy,
            ignore=lambda d, names: [LOCK_FILE] if os.path.abspath(d) == top else [],
        )
    else:
        os.makedirs(copy)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _pin_and_follow_parent(cores: Sequence[int]) -> None:
    """In a child before it runs: pins it to `cores` (so XLA's threads stay on
    them) and asks Linux to SIGTERM it if the launcher dies (no orphan runs on)."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)
    with contextlib.suppress(OSError, AttributeError):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def wait_for_processes(
    procs: Sequence[subprocess.Popen], grace: float = STOP_GRACE_SECONDS
) -> tuple[list[int], int | None]:
    """Waits for every process; when one fails, stops the others.

    A process that exits non-zero leaves the rest waiting in collectives for it, so
    they are sent SIGTERM (they report where they stopped) and, after `grace`
    seconds, SIGKILL. SIGINT and SIGTERM sent to this process are passed on to all
    (a sweep stops after the chunk they next agree on); `grace` after the
    first of them ends, the rest are killed.

    Returns:
      (exit codes, index of the process whose failure ended the run, or None).
      After a forwarded signal that is process 0 when it stopped (every process
      stops, and process 0 reports where), else the first that failed.
    """
    first_failure, signalled = None, []
    stop_at = float("inf")  # when to kill what still runs: `grace` after a failure
    term_at = float("inf")  # when to send SIGTERM after a failure

    def forward(signum, frame):
        if frame is not None:  # a signal sent to this process
            signalled.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while any(p.poll() is None for p in procs):
            for i, p in enumerate(procs):
                if first_failure is None and p.poll() not in (None, 0):
                    first_failure = i
                    stop_at = time.monotonic() + grace
                    # A moment for the others to end by themselves (bad input
                    # that every process sees) before they are told to stop.
                    term_at = time.monotonic() + SETTLE_SECONDS
            if not signalled and time.monotonic() > term_at:
                term_at = float("inf")
                forward(signal.SIGTERM, None)
            if time.monotonic() > stop_at:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.1)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    codes = [c if c >= 0 else 128 - c for c in (p.wait() for p in procs)]
    if first_failure is None or (signalled and codes[0]):
        first_failure = next((i for i, c in enumerate(codes) if c), None)
    return codes, first_failure


def _last_line(path: str) -> str:
    with open(path, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1] if lines else "(no output)"


def remove_stale_scratch() -> list[str]:
    """Deletes the scratch folders of launchers that no longer run (one killed by
    SIGKILL cannot delete its own); returns them. A folder is named after its
    launcher's pid; one whose pid runs (or was reused) is kept."""
    removed = []
    pattern = os.path.join(glob.escape(tempfile.gettempdir()), f"{SCRATCH_PREFIX}*-*")
    for path in glob.glob(pattern):
        pid = os.path.basename(path)[len(SCRATCH_PREFIX) :].split("-")[0]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def is_news(codes: Sequence[int], failed: int | None, i: int, line: str) -> bool:
    """Whether process `i`'s last line (`line`) tells the user something that
    process 0's own output does not.

    `codes` are the exit codes, `failed` the process whose failure ended the run.
    No news: a success; a stop by a signal that did not start the failure; one of
    jaxpoison's own lines when process 0 failed by itself (bad input that every
    process sees); a death by a signal after process 0 failed or stopped first
    (process 0 hosts the coordinator, and once it has left JAX aborts the others
    on their next call to it).
    """
    stopped = {128 + s for s in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)}
    zero_failed_itself = codes[0] not in stopped and codes[0] != 0
    return not (
        codes[i] == 0
        or (codes[i] in stopped and i != failed)
        or (line.startswith("jaxpoison: ") and zero_failed_itself)
        or (codes[i] > 128 and failed == 0)
    )


def run_local_processes(argv: Sequence[str], count: int, workdir: str) -> int:
    """Runs `python -m jaxpoison *argv` as `count` pinned processes of one JAX
    cluster on this machine; returns the exit code for the whole run.

    Process 0 runs in `workdir` with this terminal's output; process i > 0 runs in
    its own scratch copy of `workdir` (`mirror_workdir`), its output in a log next
    to it, both deleted at the end. The exit code is that of the process that
    failed first, 0 when all succeed. Process 0's error line is already on the
    terminal; another process's last line is printed when it failed first or with
    something other than one of jaxpoison's own lines.
    """
    groups = core_groups(allowed_cores(), count)
    base = {
        **os.environ,
        COORDINATOR_ENV: f"localhost:{_free_port()}",
        NUM_PROCESSES_ENV: str(count),
    }
    remove_stale_scratch()
    scratch = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-")
    procs, logs = [], []
    try:
        for i, cores in enumerate(groups):
            env = {**base, PROCESS_ID_ENV: str(i)}
            output = None
            if i:
                env[WORKDIR_ENV] = os.path.join(scratch, f"process{i}")
                env["TQDM_DISABLE"] = "1"  # one progress bar: process 0's
                mirror_workdir(workdir, env[WORKDIR_ENV])
                logs.append(os.path.join(scratch, f"process{i}.log"))
                output = open(logs[-1], "w")  # noqa: SIM115 - closed below
            with output or contextlib.nullcontext():
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "jaxpoison", *argv],
                        env=env,
                        stdout=output,
                        stderr=subprocess.STDOUT if output else None,
                        # Out of the terminal's process group: a Ctrl-C reaches
                        # them once, passed on by `wait_for_processes`.
                        process_group=0,
                        preexec_fn=lambda cores=cores: _pin_and_follow_parent(cores),
                    )
                )
        codes, failed = wait_for_processes(procs)
        if failed == 0 and codes[0] == 128 + signal.SIGKILL:
            print(
                "jaxpoison: interrupted; rerun the same command to resume",
                file=sys.stderr,
            )
            return codes[0]
        # Process 0's own error line is on the terminal; another process's last
        # line is shown when it is news (its error may be the cause of process 0's).
        for i in range(1, count):
            line = _last_line(logs[i - 1])
            if is_news(codes, failed, i, line):
                print(
                    f"jaxpoison: process {i} of {count} stopped (exit code "
                    f"{codes[i]}): {line}",
                    file=sys.stderr,
                )
        return 0 if failed is None else codes[failed]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(scratch, ignore_errors=True)
