"""The command line: the quickstart end to end, resume, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxpoison import UserInputError
from jaxpoison.sweep.workdir import workdir_lock
from tests.cli_runs import cli_command, cli_env, sigterm_after_first_commit

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
    # By name (configs/quickstart.py is found in the package's configs); the
    # resume test below reruns it by path.
    # Two devices, the default of a 2-core machine, compared with one device below.
    proc = run_cli(
        "--config", "quickstart:runlocal", "--cpu_devices=2", "--workdir", str(workdir)
    )
    return workdir, proc


def test_quickstart_writes_results_and_summary(quickstart_run):
    workdir, proc = quickstart_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == (
        f"jaxpoison: results in {workdir} (results.jsonl, summary.json); "
        f"report: jaxpoison report {workdir}"
    )
    rows = [json.loads(x) for x in (workdir / "results.jsonl").read_text().splitlines()]
    summary = json.loads((workdir / "summary.json").read_text())
    assert len(rows) == summary["trials"] == 16  # runlocal: 4 targets x 4 counts
    assert {r["n_poisons"] for r in rows} == {0, 1, 4, 16}
    # The shipped ResNet-20 on the shipped test sample (300 images): 244 correct.
    assert summary["pretrained_sample_test_accuracy"] == pytest.approx(244 / 300)
    assert not list(workdir.glob("**/.tmp-*")), "temporary files left behind"


def test_one_device_per_core_gives_the_one_device_results(quickstart_run, tmp_path):
    # The default splits trials over one CPU device per core; one device must give
    # the same rows within float tolerance (numbers may differ in the last bits).
    workdir, _ = quickstart_run
    proc = run_cli(
        "--config",
        "configs/quickstart.py:runlocal",
        "--cpu_devices=1",
        "--workdir",
        str(tmp_path / "one"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    split, one = (
        [json.loads(x) for x in (w / "results.jsonl").read_text().splitlines()]
        for w in (workdir, tmp_path / "one")
    )
    assert len(split) == len(one) == 16
    for a, b in zip(split, one, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
            else:
                assert a[key] == b[key], key


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
    assert "--download" in proc.stderr and "cifar10_sample" in proc.stderr


def _config_files() -> dict[str, str]:
    """configs/*.py -> the first line of its docstring, read independently."""
    import ast

    return {
        p.stem: ast.get_docstring(ast.parse(p.read_text())).splitlines()[0]
        for p in sorted((REPO / "configs").glob("*.py"))
        if not p.stem.startswith("_")
    }


def test_help_lists_the_flags_and_every_experiment():
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    for flag in ("config", "workdir", "data_dir", "manual_dir", "[no]download"):
        assert f"  --{flag}:" in proc.stdout, flag
    listed = run_cli("list")
    assert listed.returncode == 0, listed.stderr
    for name, summary in _config_files().items():
        line = next(x for x in proc.stdout.splitlines() if x.split()[:1] == [name])
        assert line.split(None, 1)[1] == summary
        assert line in listed.stdout.splitlines()
    assert len(listed.stdout.splitlines()) == len(_config_files())


def test_config_resolves_by_name_and_keeps_paths(tmp_path, monkeypatch):
    from jaxpoison import catalog

    path = str(REPO / "configs" / "quickstart.py")
    monkeypatch.chdir(tmp_path)  # no configs/ here: names come from the package
    assert catalog.resolve_config("quickstart") == path + ""
    assert catalog.resolve_config("quickstart:runlocal,seed=3") == (
        path + ":runlocal,seed=3"
    )
    assert catalog.resolve_config("quickstart.py:runlocal") == path + ":runlocal"
    for given in ("configs/quickstart.py:runlocal", "./x.py", "/no/such.py:a"):
        assert catalog.resolve_config(given) == given  # paths stay as given
    with pytest.raises(UserInputError, match="no config file or experiment named"):
        catalog.resolve_config("quikstart:runlocal")


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


@pytest.mark.parametrize(
    "args, message",
    [
        (["--cpu_devices=100"], "--cpu_devices=100"),
        (["--config.victim.learning_rate=nan"], "victim.learning_rate is nan"),
        (["--config.seed=-1"], "config field seed is -1"),
        (["--config.num_targets=0"], "num_targets is 0; it must be at least 1"),
        (["--config.num_targets=100000"], "num_targets=100000 > the 300 test"),
        (["--config.victim.epochs=0"], "victim.epochs is 0; it must be at least 1"),
        (["--config.poison_counts=(0,-1)"], "cannot hold negative values"),
        (["--config.poison_counts=()"], "poison_counts is empty"),
    ],
)
def test_unusable_settings_fail_cleanly(tmp_path, args, message):
    workdir = tmp_path / "out"
    proc = run_cli(
        "--config", "configs/quickstart.py:runlocal", *args, "--workdir", str(workdir)
    )
    _assert_clean_failure(proc, message, workdir)


def test_config_file_without_get_config_fails_cleanly(tmp_path):
    workdir = tmp_path / "out"
    (tmp_path / "bad.py").write_text("x = 1\n")
    proc = run_cli("--config", str(tmp_path / "bad.py"), "--workdir", str(workdir))
    _assert_clean_failure(proc, "has no get_config(arg) function", workdir)


def test_truncated_weights_fail_cleanly(tmp_path):
    from jaxpoison.models import shipped_weights

    weights = tmp_path / "w.npz"
    data = Path(shipped_weights()).read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    workdir = tmp_path / "out"
    proc = run_cli(
        "--config",
        "configs/quickstart.py:runlocal",
        f"--config.weights={weights}",
        "--workdir",
        str(workdir),
    )
    _assert_clean_failure(proc, "is corrupt or truncated", workdir)


def test_workdir_that_is_a_file_fails_cleanly(tmp_path):
    path = tmp_path / "out"
    path.write_text("not a folder")
    proc = run_cli("--config", "configs/quickstart.py:runlocal", "--workdir", str(path))
    assert proc.returncode == 2 and "is a file, not a folder" in proc.stderr
    assert path.read_text() == "not a folder"


# --- through the command line -------------------------------------------------------

QUICK = ["--config", "configs/quickstart.py:runlocal"]


def _cli(args, workdir):
    return subprocess.run(
        cli_command(args, workdir),
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_rerun_with_other_weights_is_refused_and_touches_nothing(quickstart_run):
    quickstart_run, _ = quickstart_run
    before = (quickstart_run / "results.jsonl").read_bytes()
    weights = REPO.parent / "shared" / "data" / "weights" / "resnet32_cifar10.npz"
    proc = _cli(
        [*QUICK, "--config.model=resnet32", f"--config.weights={weights}"],
        quickstart_run,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("jaxpoison: error: ")
    assert "different config" in proc.stderr and proc.stderr.count("\n") == 1
    assert (quickstart_run / "results.jsonl").read_bytes() == before


def test_second_run_into_a_busy_workdir_names_the_holder(quickstart_run):
    quickstart_run, _ = quickstart_run
    with workdir_lock(str(quickstart_run)):
        proc = _cli(QUICK, quickstart_run)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "is in use by another run (pid" in proc.stderr


def test_sigterm_says_where_it_stopped_and_the_rerun_resumes(quickstart_run, tmp_path):
    quickstart_run, _ = quickstart_run
    workdir = tmp_path / "run"
    proc = subprocess.Popen(
        cli_command(QUICK, workdir),
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    stopped = sigterm_after_first_commit(proc, workdir)
    if stopped is None:
        pytest.skip("the run finished before the signal landed")
    code, err = stopped
    assert code == 143
    assert err.strip().splitlines()[-1] == (
        "jaxpoison: interrupted after 1 of 2 chunks; rerun the same command to resume"
    )
    assert _cli(QUICK, workdir).returncode == 0
    assert (workdir / "results.jsonl").read_bytes() == (
        quickstart_run / "results.jsonl"
    ).read_bytes()
    assert json.loads((workdir / "sweep.json").read_text())["chunks"] == 2


def test_sigkilled_quickstart_resumes_identically(quickstart_run, tmp_path):
    from tests.cli_runs import assert_resumes_identically, chunk_committed

    workdir, _ = quickstart_run
    assert_resumes_identically(QUICK, tmp_path, workdir, chunk_committed(0))


def test_an_experiment_needing_the_data_extra_says_so(capsys):
    """Without the `data` extra, an experiment that imports TensorFlow ends with one
    line naming the extra (checked for real in a TensorFlow-free wheel install)."""
    from jaxpoison.main import execute

    def run(config, workdir):
        raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")

    with pytest.raises(SystemExit) as done:
        execute(run, {"experiment": "badnets_roadsigns"}, "unused")
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'jaxpoison[data]'" in err
