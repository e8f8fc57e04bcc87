"""The command line: the quickstart end to end, resume, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, "-m", "jaxpoison", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("quickstart") / "run"
    proc = run_cli(
        "--config", "configs/quickstart.py:runlocal", "--workdir", str(workdir)
    )
    return workdir, proc


def test_quickstart_writes_results_and_summary(quickstart_run):
    workdir, proc = quickstart_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(x) for x in (workdir / "results.jsonl").read_text().splitlines()]
    summary = json.loads((workdir / "summary.json").read_text())
    assert len(rows) == summary["trials"] == 16  # runlocal: 4 targets x 4 counts
    assert {r["n_poisons"] for r in rows} == {0, 1, 4, 16}
    # The shipped ResNet-20 on the shipped test sample (300 images): 244 correct.
    assert summary["pretrained_sample_test_accuracy"] == pytest.approx(244 / 300)
    assert not list(workdir.glob("**/.tmp-*")), "temporary files left behind"


def test_quickstart_resumes_without_redoing_chunks(quickstart_run):
    workdir, _ = quickstart_run
    before = {p: p.stat().st_mtime_ns for p in (workdir / "chunks").iterdir()}
    proc = run_cli(
        "--config", "configs/quickstart.py:runlocal", "--workdir", str(workdir)
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = {p: p.stat().st_mtime_ns for p in (workdir / "chunks").iterdir()}
    assert before == after


def _assert_clean_failure(proc, message, workdir):
    assert proc.returncode == 2
    lines = [x for x in proc.stderr.splitlines() if x.startswith("jaxpoison: error")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not workdir.exists()


def test_unknown_config_argument_fails_cleanly(tmp_path):
    workdir = tmp_path / "out"
    proc = run_cli(
        "--config",
        "configs/quickstart.py:runlocal,targets=3",
        "--workdir",
        str(workdir),
    )
    _assert_clean_failure(proc, "unknown config argument 'targets'", workdir)


def test_unknown_model_fails_cleanly(tmp_path):
    workdir = tmp_path / "out"
    proc = run_cli(
        "--config",
        "configs/quickstart.py:runlocal",
        "--config.model=resnet21",
        "--workdir",
        str(workdir),
    )
    _assert_clean_failure(proc, "unknown model 'resnet21'", workdir)


def test_weights_that_do_not_fit_fail_cleanly(tmp_path, shared_data):
    workdir = tmp_path / "out"
    weights = shared_data / "weights" / "resnet32_cifar10.npz"
    proc = run_cli(
        "--config",
        "configs/quickstart.py:runlocal",
        f"--config.weights={weights}",
        "--workdir",
        str(workdir),
    )
    _assert_clean_failure(proc, "does not fit the architecture", workdir)


def test_impossible_budget_fails_cleanly(tmp_path):
    workdir = tmp_path / "out"
    proc = run_cli(
        "--config",
        "configs/quickstart.py:runlocal",
        "--config.poison_counts=(0,1000)",
        "--workdir",
        str(workdir),
    )
    _assert_clean_failure(proc, "impossible budget", workdir)


def test_missing_config_file_fails_cleanly(tmp_path):
    workdir = tmp_path / "out"
    proc = run_cli("--config", "configs/no_such_config.py", "--workdir", str(workdir))
    _assert_clean_failure(proc, "No such file or directory", workdir)


def test_override_of_unknown_field_fails_cleanly(tmp_path):
    workdir = tmp_path / "out"
    proc = run_cli(
        "--config",
        "configs/quickstart.py:runlocal",
        "--config.victim.lr=0.1",
        "--workdir",
        str(workdir),
    )
    _assert_clean_failure(proc, "no config field 'lr'", workdir)


def test_missing_data_dir_fails_cleanly(tmp_path):
    workdir = tmp_path / "out"
    proc = run_cli(
        "--config",
        "configs/frogs_benchmark.py:runlocal",
        "--workdir",
        str(workdir),
        "--data_dir",
        str(tmp_path / "no_tfds_here"),
    )
    _assert_clean_failure(proc, "cifar10 is not prepared in data dir", workdir)


def test_negative_cpu_devices_fails_cleanly(tmp_path):
    workdir = tmp_path / "out"
    proc = run_cli(
        "--config",
        "configs/quickstart.py:runlocal",
        "--cpu_devices=-2",
        "--workdir",
        str(workdir),
    )
    _assert_clean_failure(proc, "--cpu_devices=-2", workdir)


def test_cpu_devices_leave_a_forced_device_count_alone(monkeypatch):
    from jaxpoison.distributed import split_cpu_into_devices

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert split_cpu_into_devices(2) == 0  # XLA_FLAGS wins; JAX config untouched
