"""The benchmark-table experiment: victim rows, the shared pool, and the CLI run
end to end (a smoke size, two chunks over one device per core) and resumed after
a SIGKILL."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxpoison.attacks.interop import load_benchmark_format, load_poisons_npz
from jaxpoison.data.benchmark import victim_rows
from jaxpoison.experiments import benchmark_transfer
from jaxpoison.experiments.common import row_pool, scatter_rows
from jaxpoison.report import write_report
from tests.cli_runs import assert_resumes_identically, chunk_committed, run_cli

SMOKE = ["--config", "configs/frogs_benchmark.py:smoke"]


def test_clean_pool_rows_are_the_rows_some_victim_reads_unpoisoned():
    """Two setups over 3 classes x 4 images, 2 per class, one base each: a base is
    skipped unless the other setup trains on it clean (looped by hand)."""
    labels = np.repeat(np.arange(3), 4)  # rows 0-3 class 0, 4-7 class 1, 8-11 class 2
    bases = np.array([[3], [4]])  # row 4 is clean in setup 0
    subsets = [victim_rows(labels, c, b, 2) for c, b in zip([0, 1], bases, strict=True)]
    pool = row_pool(len(labels), *subsets)
    # setup 0: 0 | 3(base) | 4 5 | 8 9; setup 1: 0 1 | 4(base) 5 | 8 9
    np.testing.assert_array_equal(pool.rows, [0, 1, 3, 4, 5, 8, 9])
    np.testing.assert_array_equal(pool.at(bases), [[2], [3]])
    clean = benchmark_transfer.clean_pool_rows(
        [pool.at(s) for s in subsets], pool.at(bases), 7
    )
    np.testing.assert_array_equal(pool.rows[clean], [0, 1, 4, 5, 8, 9])  # not row 3
    filled = scatter_rows(np.ones((6, 2), np.float32), clean, 7)
    np.testing.assert_array_equal(np.asarray(filled)[:, 0], [1, 1, 0, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="outside the pool"):
        pool.at([2])


@pytest.fixture(scope="module")
def smoke_run(cifar_tfds_dir, tmp_path_factory):
    """One uninterrupted smoke run through the CLI (shared by the tests below)."""
    args = [*SMOKE, "--data_dir", cifar_tfds_dir]
    workdir = tmp_path_factory.mktemp("frogs_benchmark") / "whole"
    run_cli(args, workdir)
    return args, workdir


@pytest.mark.experiment
@pytest.mark.realdata
def test_smoke_run_writes_rows_poisons_and_benchmark_format(smoke_run):
    _, workdir = smoke_run
    rows = [
        json.loads(x) for x in (workdir / "results.jsonl").read_text().split("\n") if x
    ]
    summary = json.loads((workdir / "summary.json").read_text())
    assert [r["setup"] for r in rows] == [0, 1, 2, 3]
    assert summary["success"]["n"] == 4
    # 8/255 ball, then 8-bit truncation as the benchmark saves poisons: its own
    # poison_test.py accepts up to 9/255.
    assert all(r["max_perturbation"] <= 9 / 255 + 1e-6 for r in rows)
    poisons = load_poisons_npz(str(workdir / "poisons.npz"))
    assert poisons["poisons"].shape == (4, 25, 32, 32, 3)
    np.testing.assert_array_equal(poisons["setup"], [0, 1, 2, 3])
    setup2 = load_benchmark_format(str(workdir / "benchmark_format" / "setup_002"))
    np.testing.assert_array_equal(setup2["poisons"], poisons["poisons"][2])
    np.testing.assert_array_equal(setup2["base_indices"], poisons["base_indices"][2])
    assert (workdir / "results.png").stat().st_size > 0
    with open(write_report(str(workdir))) as f:
        assert "| 4 of 4 | finished |" in f.read()


@pytest.mark.slow
@pytest.mark.realdata
def test_sigkill_after_the_first_chunk_resumes_identically(smoke_run, tmp_path):
    args, whole = smoke_run
    resumed = assert_resumes_identically(
        args, tmp_path, whole, killed_when=chunk_committed(0)
    )
    # The killed run's poisons are kept, the rest made on resume: the same file.
    a = load_poisons_npz(str(resumed / "poisons.npz"))
    b = load_poisons_npz(str(whole / "poisons.npz"))
    for k in b:
        np.testing.assert_array_equal(a[k], b[k])
