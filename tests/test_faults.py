"""Faults the sweep survives: damaged checkpoints, kills, signals, a full disk.

Each case is reproduced, then the same command is rerun: it must resume without
losing or repeating a committed chunk, and say what happened in one line.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal

import numpy as np
import pytest

from jaxpoison import report
from jaxpoison.errors import Interrupted, UserInputError
from jaxpoison.main import execute
from jaxpoison.sweep import run_chunks

SPECS = {"id": np.arange(7)}


def square_rows(seen):
    def trial_rows(chunk):
        seen.append([int(i) for i in chunk["id"]])
        return [{"id": int(i), "square": int(i) ** 2} for i in chunk["id"]]

    return trial_rows


def _steps(workdir):
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def _damage(step_dir):
    """Truncates every file of an orbax step (metadata included)."""
    for path in step_dir.rglob("*"):
        if path.is_file():
            path.write_bytes(b"")


def test_damaged_latest_step_falls_back_to_the_one_before(tmp_path, capsys):
    rows = run_chunks(square_rows([]), SPECS, 3, str(tmp_path))
    assert _steps(tmp_path) == [2, 3]
    _damage(tmp_path / "checkpoints" / "3")
    seen = []
    assert run_chunks(square_rows(seen), SPECS, 3, str(tmp_path)) == rows
    assert seen == [[6]]  # only the chunk the damaged step committed
    assert "checkpoint step 3 is damaged" in capsys.readouterr().err


def test_no_intact_step_rebuilds_from_the_chunk_files(tmp_path, capsys):
    rows = run_chunks(square_rows([]), SPECS, 3, str(tmp_path))
    for step in _steps(tmp_path):
        _damage(tmp_path / "checkpoints" / str(step))
    seen = []
    assert run_chunks(square_rows(seen), SPECS, 3, str(tmp_path)) == rows
    assert seen == []
    assert "rebuilt the sweep state from 3 chunk files" in capsys.readouterr().err


def test_checkpoint_of_another_sweep_is_refused_without_sweep_json(tmp_path):
    run_chunks(square_rows([]), SPECS, 3, str(tmp_path))
    (tmp_path / "sweep.json").unlink()
    with pytest.raises(UserInputError, match="different sweep"):
        run_chunks(square_rows([]), {"id": np.arange(1, 8)}, 3, str(tmp_path))


def test_partial_files_of_a_killed_write_are_removed(tmp_path):
    (tmp_path / "chunks").mkdir()
    stale = tmp_path / "chunks" / ".tmp-abc.part"
    stale.write_text("half a ro")
    run_chunks(square_rows([]), SPECS, 3, str(tmp_path))
    assert not stale.exists()


def test_full_disk_stops_and_the_rerun_resumes(tmp_path, monkeypatch, capsys):
    from jaxpoison.sweep import chunks

    real = chunks.write_jsonl

    def full_after_first(path, rows):
        if path.endswith("00001.jsonl"):
            raise OSError(errno.ENOSPC, "No space left on device", path)
        real(path, rows)

    monkeypatch.setattr(chunks, "write_jsonl", full_after_first)
    with pytest.raises(SystemExit) as stop:
        execute(lambda c, w: run_chunks(square_rows([]), SPECS, 3, w), None, tmp_path)
    assert stop.value.code == 2
    last = capsys.readouterr().err.strip().split("\r")[-1].splitlines()[-1]
    assert last.startswith("jaxpoison: error: no space left on the device writing")
    monkeypatch.setattr(chunks, "write_jsonl", real)
    seen = []
    rows = run_chunks(square_rows(seen), SPECS, 3, str(tmp_path))
    assert seen == [[3, 4, 5], [6]] and [r["id"] for r in rows] == list(range(7))


@pytest.mark.parametrize(
    "error, code", [(KeyboardInterrupt(), 130), (Interrupted(signal.SIGTERM), 143)]
)
def test_interruption_is_one_line_with_progress(error, code, tmp_path, capsys):
    def interrupted_after_one_chunk(config, workdir):
        def rows(chunk):
            if chunk["id"][0] == 3:
                raise error
            return square_rows([])(chunk)

        run_chunks(rows, SPECS, 3, workdir)

    with pytest.raises(SystemExit) as stop:
        execute(interrupted_after_one_chunk, None, str(tmp_path))
    assert stop.value.code == code
    last = capsys.readouterr().err.split("\r")[-1].splitlines()[-1]
    assert last == (
        "jaxpoison: interrupted after 1 of 3 chunks; rerun the same command to resume"
    )


def test_report_counts_committed_chunks_only(tmp_path):
    run_chunks(square_rows([]), SPECS, 3, str(tmp_path))
    (tmp_path / "results.jsonl").unlink()
    shutil.rmtree(tmp_path / "checkpoints" / "3")  # chunk 2 written, not committed
    assert report.sweep_progress(str(tmp_path))["done"] == 6


def test_report_of_a_damaged_results_file_is_one_line(tmp_path, capsys):
    (tmp_path / "results.jsonl").write_text('{"id": 1}\n{"id": 2, "squ')
    assert report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "results.jsonl is missing or damaged" in err


def _weights_copy(tmp_path, change):
    from jaxpoison.models import shipped_weights

    with np.load(shipped_weights()) as npz:
        state = {k: npz[k] for k in npz.files}
    change(state)
    path = tmp_path / "w.npz"
    np.savez(path, **state)
    return path


def test_weights_with_nan_are_refused_at_load(tmp_path):
    from jaxpoison.models import load_pretrained

    def poison(state):
        key = next(k for k in state if k.endswith("conv1.weight"))
        state[key] = state[key].copy()
        state[key].flat[0] = np.nan

    with pytest.raises(UserInputError, match="non-finite values"):
        load_pretrained("resnet20", str(_weights_copy(tmp_path, poison)))


def test_truncated_weights_file_is_one_clear_error(tmp_path):
    from jaxpoison.models import load_pretrained

    path = _weights_copy(tmp_path, lambda state: None)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserInputError, match="corrupt or truncated"):
        load_pretrained("resnet20", str(path))


@pytest.fixture
def cifar_copy(cifar_tfds_dir, tmp_path):
    """A private copy of the cifar10 tfds dir (big files hard-linked, not copied)."""
    import os

    source = os.path.join(cifar_tfds_dir, "cifar10")
    target = tmp_path / "tfds" / "cifar10"
    for folder, _, files in os.walk(source):
        dest = target / os.path.relpath(folder, source)
        dest.mkdir(parents=True, exist_ok=True)
        for name in files:
            try:
                os.link(os.path.join(folder, name), dest / name)
            except OSError:  # another file system: copy
                shutil.copy2(os.path.join(folder, name), dest / name)
    return tmp_path / "tfds", next(target.iterdir())


def _replace(path, data: bytes):
    path.unlink()  # a new file: the hard-linked original stays intact
    path.write_bytes(data)


def test_truncated_tfds_record_is_one_clear_error(cifar_copy):
    from jaxpoison.data import load_cifar10

    data_dir, version = cifar_copy
    record = next(version.glob("cifar10-test.tfrecord*"))
    _replace(record, record.read_bytes()[:100_000])
    with pytest.raises(UserInputError, match="cifar10 dataset in .* is damaged"):
        load_cifar10("test", str(data_dir))


def test_broken_dataset_info_is_one_clear_error(cifar_copy):
    from jaxpoison.data import load_cifar10

    data_dir, version = cifar_copy
    _replace(version / "dataset_info.json", b'{"name": "cifar10", "vers')
    with pytest.raises(UserInputError, match="cifar10 dataset in .* is damaged"):
        load_cifar10("test", str(data_dir))


def test_a_sigterm_during_a_commit_lands_after_it():
    """The block finishes (the chunk is committed and counted) before the signal's
    handler raises, so "N of M chunks" matches the disk."""
    from jaxpoison.sweep.chunks import signals_held

    def interrupt(signum, frame):
        raise Interrupted(signum)

    before = signal.signal(signal.SIGTERM, interrupt)
    finished = []
    try:
        with pytest.raises(Interrupted):
            with signals_held():
                os.kill(os.getpid(), signal.SIGTERM)
                finished.append(True)
        assert finished == [True]
        assert signal.getsignal(signal.SIGTERM) is interrupt  # restored
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_second_signal_in_a_sweep_held_for_several_processes_stops_at_once(
    capsys,
):
    from jaxpoison.sweep.chunks import signals_held

    reached = []
    with pytest.raises(Interrupted):
        with signals_held("stopping after this chunk", force_on_second=True) as held:
            os.kill(os.getpid(), signal.SIGTERM)
            reached.append(held())  # the first is held
            os.kill(os.getpid(), signal.SIGTERM)
            reached.append("after the second")
    assert reached == [signal.SIGTERM]
    assert "stopping after this chunk" in capsys.readouterr().err
