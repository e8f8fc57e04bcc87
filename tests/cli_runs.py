"""Running experiments through the command line in tests, killing and resuming them.

    whole = run_cli(["--config", "configs/x.py:smoke"], tmp_path / "whole")
    assert_resumes_identically(
        ["--config", "configs/x.py:smoke"], tmp_path, whole,
        killed_when=chunk_committed(0),
    )

`assert_resumes_identically` starts the same command into a second workdir, sends
SIGKILL once `killed_when(workdir)` holds (e.g. the first chunk is committed), checks
the run really died before finishing, reruns the same command to the end and
compares `results.jsonl` byte for byte with the uninterrupted run's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from jaxpoison.results import read_jsonl

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 600


def tfds_dir() -> str:
    """The tfds data dir of CLI runs in tests (CI's cache, as tests/conftest.py):
    datasets prepared from ../shared (road_signs) are prepared there once."""
    return os.environ.get("JAXPOISON_TFDS_DIR") or os.path.expanduser(
        "~/.cache/jaxpoison/tfds"
    )


def cli_env(devices: int | None = None) -> dict[str, str]:
    """The environment of a CLI run: this checkout first on the path, CPU only."""
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), env.get("PYTHONPATH", "")) if p
    )
    if devices is not None:
        flags = env.get("XLA_FLAGS", "")
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}"
    return env


# Trials split over two CPU devices, as the default does on a 2-core machine, even
# where the test worker is pinned to one core (tests/conftest.py).
DEVICES_FLAG = "--cpu_devices=2"


def cli_command(args: Sequence[str], workdir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jaxpoison",
        *args,
        DEVICES_FLAG,
        "--workdir",
        str(workdir),
    ]


def run_cli(
    args: Sequence[str], workdir: Path, devices: int | None = None
) -> subprocess.CompletedProcess:
    """Runs `python -m jaxpoison ARGS --workdir WORKDIR` to the end; must succeed."""
    proc = subprocess.run(
        cli_command(args, workdir),
        cwd=REPO,
        env=cli_env(devices),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def run_python(script: str, devices: int) -> None:
    """Runs `script` (indented text, dedented) in a fresh Python with `devices` fake
    CPU devices; it must exit 0 and print "ok"."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=REPO,
        env=cli_env(devices),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-6000:]


# `python -m jaxpoison ARGS` from every core of the machine: the test workers are
# pinned to one core each (tests/conftest.py), and `--processes N` gives each of
# its N processes a share of the cores the command may use. Set in the child
# itself: a `preexec_fn` would fork this (multithreaded, JAX-running) process.
EVERY_CORE = [
    "-c",
    "import os, runpy, sys; "
    "hasattr(os, 'sched_setaffinity') and "
    "os.sched_setaffinity(0, range(os.cpu_count() or 1)); "
    "sys.argv[0] = 'jaxpoison'; runpy.run_module('jaxpoison', run_name='__main__')",
]


def run_cli_processes(
    args: Sequence[str], workdir: Path, processes: int = 2
) -> subprocess.CompletedProcess:
    """`python -m jaxpoison ARGS --processes N --workdir WORKDIR` from every core,
    to the end; must succeed."""
    proc = subprocess.run(
        [sys.executable, *EVERY_CORE, *args, f"--processes={processes}"]
        + ["--workdir", str(workdir)],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def assert_same_rows(a: Path, b: Path, rtol: float = 1e-4, atol: float = 1e-4):
    """The `results.jsonl` of workdirs `a` and `b` hold the same rows: the same
    keys and non-float values, floats within tolerance ("seconds" ignored)."""

    def same(x, y, where):
        if isinstance(x, dict):
            assert x.keys() == y.keys(), where
            for k in x:
                if k != "seconds":
                    same(x[k], y[k], f"{where}.{k}")
        elif isinstance(x, list):
            assert len(x) == len(y), where
            for i, (u, v) in enumerate(zip(x, y, strict=True)):
                same(u, v, f"{where}[{i}]")
        elif isinstance(x, float) or isinstance(y, float):
            assert abs(x - y) <= atol + rtol * abs(y), (where, x, y)
        else:
            assert x == y, (where, x, y)

    rows = [read_jsonl(str(w / "results.jsonl")) for w in (a, b)]
    assert len(rows[0]) == len(rows[1])
    for i, (x, y) in enumerate(zip(*rows, strict=True)):
        same(x, y, f"row {i}")


def sigterm_after_first_commit(
    proc: subprocess.Popen, workdir: Path
) -> tuple[int, str] | None:
    """SIGTERMs `proc` (stderr piped) once the sweep in `workdir` has committed
    its first chunk; (exit code, stderr), or None when it finished first."""
    deadline = time.monotonic() + 300
    while not chunk_committed(0)(workdir):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    return None if proc.returncode == 0 else (proc.returncode, err)


def chunk_committed(index: int, sweep: str = ".") -> Callable[[Path], bool]:
    """True once chunk `index` of the sweep in `workdir/sweep` has its checkpoint."""

    def committed(workdir: Path) -> bool:
        return (workdir / sweep / "checkpoints" / str(index + 1)).is_dir()

    return committed


def file_exists(relative: str) -> Callable[[Path], bool]:
    """True once `workdir/relative` exists (a saved step, a target's poisons)."""
    return lambda workdir: (workdir / relative).exists()


def kill_when(
    args: Sequence[str],
    workdir: Path,
    killed_when: Callable[[Path], bool],
    devices: int | None = None,
) -> None:
    """Starts the run and SIGKILLs it once `killed_when(workdir)` holds."""
    proc = subprocess.Popen(
        cli_command(args, workdir),
        cwd=REPO,
        env=cli_env(devices),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + TIMEOUT
    try:
        while not killed_when(workdir):
            if proc.poll() is not None:
                raise AssertionError(
                    "the run ended before the kill point: " + proc.stderr.read()[-4000:]
                )
            assert time.monotonic() < deadline, "the kill point never came"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signal.SIGKILL


def assert_resumes_identically(
    args: Sequence[str],
    tmp_path: Path,
    uninterrupted: Path,
    killed_when: Callable[[Path], bool],
    devices: int | None = None,
) -> Path:
    """Kill a run at `killed_when`, rerun it, compare with `uninterrupted`'s rows.

    Returns the resumed workdir.
    """
    workdir = tmp_path / "killed"
    kill_when(args, workdir, killed_when, devices)
    assert not (workdir / "results.jsonl").exists(), "killed after it finished"
    run_cli(args, workdir, devices)
    resumed = (workdir / "results.jsonl").read_bytes()
    assert resumed == (uninterrupted / "results.jsonl").read_bytes()
    return workdir
