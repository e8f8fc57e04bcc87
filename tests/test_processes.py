"""`--processes N`: N pinned JAX processes on one machine, one run's results.

The CLI runs start from every core of the machine (`cli_runs.EVERY_CORE`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from jaxpoison.distributed import (
    SCRATCH_PREFIX,
    _free_port,
    core_groups,
    is_news,
    mirror_workdir,
    remove_stale_scratch,
    wait_for_processes,
)
from jaxpoison.results import read_jsonl
from jaxpoison.sweep.workdir import LOCK_FILE
from tests.cli_runs import (
    EVERY_CORE,
    assert_same_rows,
    cli_env,
    sigterm_after_first_commit,
)

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--config", "configs/quickstart.py:runlocal"]
CORES = os.cpu_count() or 1
two_cores = pytest.mark.skipif(CORES < 2, reason="--processes 2 needs two cores")


def _start(args: list[str], workdir: Path, tmp: Path, **kwargs) -> subprocess.Popen:
    """`python -m jaxpoison ARGS --workdir WORKDIR`, its scratch folders in `tmp`."""
    tmp.mkdir(exist_ok=True)
    return subprocess.Popen(
        [sys.executable, *EVERY_CORE, *args, "--workdir", str(workdir)],
        cwd=REPO,
        env={**cli_env(), "TMPDIR": str(tmp), "TF_CPP_MIN_LOG_LEVEL": "3"},
        text=True,
        **kwargs,
    )


def _run(args: list[str], workdir: Path, tmp: Path) -> subprocess.CompletedProcess:
    proc = _start(args, workdir, tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _rows(workdir: Path) -> list[dict]:
    return read_jsonl(str(workdir / "results.jsonl"))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The quickstart run by one process with one device per core."""
    workdir = tmp_path_factory.mktemp("one") / "run"
    proc = _run(QUICK, workdir, workdir.parent / "tmp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


def test_core_groups_are_contiguous_and_differ_by_at_most_one():
    assert core_groups([0, 1, 2, 3, 4], 2) == [[0, 1, 2], [3, 4]]
    assert core_groups([4, 5, 6, 7], 4) == [[4], [5], [6], [7]]
    assert core_groups([2, 3], 1) == [[2, 3]]
    with pytest.raises(ValueError, match="cannot split 2 cores into 3"):
        core_groups([0, 1], 3)


def test_mirror_workdir_copies_everything_but_the_lock(tmp_path):
    workdir = tmp_path / "run"
    (workdir / "chunks").mkdir(parents=True)
    (workdir / "chunks" / "00000.jsonl").write_text('{"a": 1}\n')
    (workdir / "config.json").write_text("{}\n")
    (workdir / LOCK_FILE).write_text("123\n")
    copy = tmp_path / "copy"
    (copy / "stale").mkdir(parents=True)  # a previous launch's leftovers go
    mirror_workdir(str(workdir), str(copy))
    files = sorted(str(p.relative_to(copy)) for p in copy.rglob("*") if p.is_file())
    assert files == ["chunks/00000.jsonl", "config.json"]
    mirror_workdir(str(tmp_path / "not_yet"), str(copy))  # a fresh run: empty
    assert list(copy.iterdir()) == []


def test_stale_scratch_of_dead_launchers_is_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    finished = subprocess.Popen(["true"])
    finished.wait()  # its pid no longer runs
    dead = tmp_path / f"{SCRATCH_PREFIX}{finished.pid}-abc"
    alive = tmp_path / f"{SCRATCH_PREFIX}{os.getpid()}-def"
    unnamed = tmp_path / f"{SCRATCH_PREFIX}ghi"  # no pid: not ours to judge
    for folder in (dead, alive, unnamed):
        (folder / "process1").mkdir(parents=True)
    assert remove_stale_scratch() == [str(dead)]
    assert sorted(tmp_path.iterdir()) == sorted([alive, unnamed])


ABORTED = 128 + signal.SIGABRT
TERMINATED = 128 + signal.SIGTERM


@pytest.mark.parametrize(
    ("codes", "failed", "line", "news"),
    [
        ([2, 0], 0, "done", False),  # process 1 finished
        ([2, 2], 0, "jaxpoison: error: impossible budget", False),  # both saw it
        ([2, ABORTED], 0, "Fatal Python error: Aborted", False),  # lost process 0
        ([TERMINATED, ABORTED], 0, "Fatal Python error: Aborted", False),
        ([TERMINATED, ABORTED], 1, "Fatal Python error: Aborted", True),  # first
        ([2, 1], 0, "ValueError: only process 1 saw this", True),
        ([TERMINATED, TERMINATED], 0, "interrupted", False),  # both were stopped
    ],
)
def test_another_process_s_line_is_shown_only_when_it_is_news(
    codes, failed, line, news
):
    assert is_news(codes, failed, 1, line) == news


def _python(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code])


def test_a_failed_process_stops_the_others():
    failing = _python("import sys, time; time.sleep(0.5); sys.exit(3)")
    waiting = _python("import time; time.sleep(60)")  # as if blocked in a collective
    start = time.monotonic()
    codes, failed = wait_for_processes([waiting, failing], grace=5)
    assert (codes, failed) == ([128 + signal.SIGTERM, 3], 1)
    assert time.monotonic() - start < 30


def test_a_process_deaf_to_sigterm_is_killed_after_the_grace():
    failing = _python("import sys; sys.exit(2)")
    deaf = _python(
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "time.sleep(60)"
    )
    codes, failed = wait_for_processes([failing, deaf], grace=1)
    assert (codes, failed) == ([2, 128 + signal.SIGKILL], 0)


_FAIL_IN_A_CLUSTER = """
import atexit, sys
import jax
from jaxpoison.distributed import _free_port, failures_exit_at_once

if sys.argv[1] == "cluster":
    jax.distributed.initialize(f"localhost:{_free_port()}", 1, 0)
atexit.register(print, "exit handlers ran")
with failures_exit_at_once():
    print("failing", flush=True)
    sys.exit(3)
"""


@pytest.mark.parametrize(
    ("mode", "handlers_run"), [("cluster", False), ("alone", True)]
)
def test_a_failure_in_a_cluster_exits_without_the_exit_handlers(mode, handlers_run):
    proc = subprocess.run(
        [sys.executable, "-c", _FAIL_IN_A_CLUSTER, mode],
        cwd=REPO,
        env={**cli_env(), "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[0] == "failing"
    assert ("exit handlers ran" in proc.stdout) == handlers_run


# Two processes of one cluster sweep 3 chunks; every chunk is a collective. Process 1
# gets SIGTERM in the middle of chunk 0, process 0 never does.
_SIGTERM_IN_ONE_PROCESS = """
import os, signal, sys
import jax, numpy as np
from jax.experimental import multihost_utils
from jaxpoison.errors import Interrupted
from jaxpoison.sweep.chunks import commit_chunks

coordinator, index, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(coordinator, num_processes=2, process_id=index)

def raise_interrupted(signum, frame):  # as the CLI's handler does
    raise Interrupted(signum)

signal.signal(signal.SIGTERM, raise_interrupted)

def chunk_rows(i, chunk):
    if i == 0 and index == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    total = int(multihost_utils.process_allgather(chunk["x"]).sum())
    return [{"x": int(x), "total": total} for x in chunk["x"]]

try:
    commit_chunks(chunk_rows, {"x": np.arange(6)}, 2, workdir)
except Interrupted as e:
    print(f"interrupted by signal {e.signum} after {e.progress}")
    sys.exit(143)
"""


def test_a_signal_to_one_process_stops_every_process_after_the_same_chunk(tmp_path):
    coordinator = f"localhost:{_free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _SIGTERM_IN_ONE_PROCESS, coordinator, str(i)]
            + [str(tmp_path / f"process{i}")],
            cwd=REPO,
            env={**cli_env(), "TF_CPP_MIN_LOG_LEVEL": "3"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:  # before the agreement, process 0 waited forever in chunk 1's collective
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 143, err[-2000:]
        assert out.strip().splitlines()[-1] == (
            f"interrupted by signal {signal.SIGTERM} after 1 of 3 chunks"
        )
    for i in range(2):
        chunks = sorted(p.name for p in (tmp_path / f"process{i}" / "chunks").iterdir())
        assert chunks == ["00000.jsonl"]


@two_cores
def test_two_processes_give_the_one_process_results(one_process, tmp_path):
    workdir, cache = tmp_path / "run", tmp_path / "cache"
    args = [*QUICK, "--processes", "2", f"--compilation_cache={cache}"]
    proc = _run(args, workdir, tmp_path / "tmp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not cache.exists()  # processes would load unevenly: no cache
    assert "jax.distributed: process 0 of 2, 1 local of 2 global" in proc.stdout
    assert (
        proc.stdout.strip()
        .splitlines()[-1]
        .startswith(f"jaxpoison: results in {workdir} (results.jsonl, summary.json)")
    )
    # Each device runs the same per-trial program, whichever process holds it.
    assert _rows(workdir) == _rows(one_process)
    assert list((tmp_path / "tmp").iterdir()) == []  # process 1's copy is gone


@two_cores
def test_two_processes_resume_a_one_process_run_without_redoing_it(
    one_process, tmp_path
):
    workdir = tmp_path / "run"
    subprocess.run(["cp", "-r", str(one_process), str(workdir)], check=True)
    committed = {p: p.stat().st_mtime_ns for p in (workdir / "chunks").iterdir()} | {
        p: p.stat().st_mtime_ns for p in (workdir / "checkpoints").iterdir()
    }
    proc = _run([*QUICK, "--processes", "2"], workdir, tmp_path / "tmp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in committed} == committed, (
        "a finished chunk was recomputed"
    )
    assert _rows(workdir) == _rows(one_process)


@two_cores
def test_bad_input_in_two_processes_fails_with_one_line_and_no_workdir(tmp_path):
    workdir = tmp_path / "out"
    args = [*QUICK, "--config.poison_counts=(0,1000)", "--processes", "2"]
    proc = _run(args, workdir, tmp_path / "tmp")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "jaxpoison: error: impossible budget: 1000 poisons > 300 images"
    ]
    assert not workdir.exists()
    assert list((tmp_path / "tmp").iterdir()) == []


def test_more_processes_than_cores_fail_cleanly(tmp_path):
    proc = _run([*QUICK, "--processes", str(CORES + 1)], tmp_path / "out", tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"jaxpoison: error: --processes={CORES + 1}: a count from 1 to {CORES} (one "
        f"process per core at most; this machine has {CORES} cores)"
    ]
    assert not (tmp_path / "out").exists()


@two_cores
def test_sigterm_stops_both_processes_after_the_same_chunk_and_the_rerun_resumes(
    one_process, tmp_path
):
    workdir = tmp_path / "run"
    # 4 chunks of 4 trials (the fixture's run: 2 of 8), so that a stop after the
    # chunk the processes agree on next leaves work for the rerun.
    args = ["--config", "configs/quickstart.py:runlocal,chunk_size=4"]
    args += ["--processes", "2"]
    proc = _start(args, workdir, tmp_path / "tmp", stderr=subprocess.PIPE)
    stopped = sigterm_after_first_commit(proc, workdir)
    if stopped is None:
        pytest.skip("the run finished before the signal landed")
    code, err = stopped
    assert code == 143
    # Processes stop together at the end of a chunk: the first, or a later one
    # when they agreed to go on just before the signal landed.
    committed = len(list((workdir / "chunks").iterdir()))
    assert 1 <= committed < 4
    assert err.strip().splitlines()[-1] == (
        f"jaxpoison: interrupted after {committed} of 4 chunks; rerun the same "
        "command to resume"
    )
    assert _run(args, workdir, tmp_path / "tmp").returncode == 0
    assert_same_rows(workdir, one_process)  # other chunk shapes: float tolerance
