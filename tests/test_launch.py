"""launch/tpu_vm.sh against a stand-in gcloud (no Cloud access here).

The stand-in logs every call; `tpu-vm ssh --command=C` runs C with bash in a fake
worker home (one worker), `tpu-vm scp` and `storage rsync` copy between local
folders (`gs://` maps to a fake bucket folder). The worker's `.venv/bin/python` is
a stand-in too, recording what it was run with: this checks the scripts' quoting,
environment and copying, not jaxpoison itself (tests/test_cli.py does that).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "tpu_vm.sh"

GCLOUD = r"""#!/usr/bin/env bash
printf '%s\n' "$*" >>"$GCLOUD_LOG"
local_path() {  # gs://X -> bucket folder; NAME:X -> worker home; else as is
  case $1 in
    gs://*) printf '%s\n' "$FAKE_BUCKET/${1#gs://}" ;;
    *:*) printf '%s\n' "$FAKE_HOME/${1#*:}" ;;
    *) printf '%s\n' "$1" ;;
  esac
}
if [ "$1 $2 $3 $4" = "compute tpus tpu-vm ssh" ]; then
  for a in "$@"; do
    case $a in --command=*) cmd=${a#--command=} ;; esac
  done
  cd "$FAKE_HOME" && HOME=$FAKE_HOME exec bash -c "$cmd"
elif [ "$1 $2 $3 $4" = "compute tpus tpu-vm scp" ]; then
  shift 4
  files=()
  for a in "$@"; do
    case $a in --*) ;; *) files+=("$(local_path "$a")") ;; esac
  done
  cp -r "${files[0]}" "${files[1]}"
elif [ "$1 $2" = "storage rsync" ]; then
  src=$(local_path "$4") dst=$(local_path "$5")
  [ -d "$src" ] || exit 1
  mkdir -p "$dst" && cp -r "$src/." "$dst/"
fi
"""

CURL = "#!/usr/bin/env bash\necho 0\n"  # TPU metadata: this is worker 0

PYTHON = r"""#!/usr/bin/env bash
{
  printf 'ARGS'; printf ' [%s]' "$@"; printf '\n'
  printf 'TFDS_DATA_DIR=%s\n' "${TFDS_DATA_DIR:-}"
  while [ $# -gt 0 ]; do
    if [ "$1" = --workdir ]; then workdir=${2/#\~/$HOME}; fi
    shift
  done
  printf 'SEEN %s\n' "$(cd "$workdir" 2>/dev/null && find . -type f | sort)"
} >>"$FAKE_HOME/python.log"
mkdir -p "$workdir/chunks" && echo '{"id": 1}' >"$workdir/chunks/00001.jsonl"
exit "${FAKE_RC:-0}"
"""


@pytest.fixture
def cloud(tmp_path):
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    bin_dir.mkdir()
    for name, text in [("gcloud", GCLOUD), ("curl", CURL)]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    venv = home / "jaxpoison" / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").write_text(PYTHON)
    (venv / "python").chmod(0o755)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path / "local_home"),
        "GCLOUD_LOG": str(tmp_path / "gcloud.log"),
        "FAKE_HOME": str(home),
        "FAKE_BUCKET": str(tmp_path / "bucket"),
    }

    def run(*args, **extra):
        return subprocess.run(
            ["bash", str(SCRIPT), *args],
            env={**env, **extra},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )

    return run, tmp_path


def _log(tmp_path: Path) -> list[str]:
    return (tmp_path / "gcloud.log").read_text().splitlines()


def test_scripts_pass_bash_n_and_shellcheck():
    for script in ["local.sh", "tpu_vm.sh"]:
        path = str(REPO / "launch" / script)
        assert subprocess.run(["bash", "-n", path]).returncode == 0
        if shutil.which("shellcheck"):
            proc = subprocess.run(["shellcheck", path], capture_output=True, text=True)
            assert proc.returncode == 0, proc.stdout


def test_create_picks_the_software_version_and_passes_flags(cloud):
    run, tmp_path = cloud
    assert run("create", "jp", "us-west4-a", "v5litepod-16", "--spot").returncode == 0
    assert _log(tmp_path) == [
        "compute tpus tpu-vm create jp --zone=us-west4-a "
        "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite --spot"
    ]


def test_run_on_every_worker_with_distributed_and_a_bucket_data_dir(cloud):
    run, tmp_path = cloud
    proc = run(
        "run",
        "jp",
        "z1",
        "configs/frogs_oneshot.py:runlocal,seed=3",
        "~/runs/a b",
        "--config.chunk_size=8",
        TFDS_DATA_DIR="gs://bucket/tfds",
    )
    assert proc.returncode == 0, proc.stderr
    (call,) = _log(tmp_path)
    assert call.startswith("compute tpus tpu-vm ssh jp --zone=z1 --worker=all ")
    lines = (tmp_path / "home" / "python.log").read_text().splitlines()
    assert lines[0] == (
        "ARGS [-m] [jaxpoison] [--config] [configs/frogs_oneshot.py:runlocal,seed=3]"
        " [--workdir] [~/runs/a b] [--distributed] [--config.chunk_size=8]"
    )  # "~" reaches the CLI, which expands it on the worker
    assert lines[1] == "TFDS_DATA_DIR=gs://bucket/tfds"


def test_run_with_sync_resumes_from_and_saves_to_the_bucket(cloud):
    run, tmp_path = cloud
    bucket = tmp_path / "bucket" / "runs" / "qs"
    (bucket / "chunks").mkdir(parents=True)
    (bucket / "chunks" / "00000.jsonl").write_text('{"id": 0}\n')
    proc = run(
        "run",
        "jp",
        "z1",
        "configs/quickstart.py",
        "~/runs/qs",
        SYNC_TO="gs://runs/qs",
        FAKE_RC="3",
    )
    assert proc.returncode == 3  # the run's exit status comes back
    log = (tmp_path / "home" / "python.log").read_text()
    assert "SEEN ./chunks/00000.jsonl" in log  # pulled before the run
    assert (bucket / "chunks" / "00001.jsonl").exists()  # pushed after it
    assert (tmp_path / "home" / "runs" / "qs" / "chunks" / "00001.jsonl").exists()


def test_fetch_copies_the_workdir_from_worker_0(cloud):
    run, tmp_path = cloud
    workdir = tmp_path / "home" / "runs" / "qs"
    workdir.mkdir(parents=True)
    (workdir / "results.jsonl").write_text("{}\n")
    proc = run("fetch", "jp", "z1", "~/runs/qs", "out")
    assert proc.returncode == 0, proc.stderr
    assert _log(tmp_path) == [
        "compute tpus tpu-vm scp --recurse jp:runs/qs out --zone=z1 --worker=0"
    ]
    assert (tmp_path / "out" / "qs" / "results.jsonl").read_text() == "{}\n"


def test_bucket_data_dir_is_passed_through_unchanged():
    from jaxpoison.data.cifar import resolve_data_dir

    assert resolve_data_dir("gs://bucket/tfds") == "gs://bucket/tfds"
