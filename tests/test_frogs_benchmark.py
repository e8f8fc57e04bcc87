"""The benchmark-table experiment: victim rows, and a small real run end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxpoison import UserInputError
from jaxpoison.attacks.interop import load_benchmark_format, load_poisons_npz
from jaxpoison.experiments import frogs_benchmark
from tests.conftest import load_config


def test_victim_rows_follow_the_benchmark_poisoned_dataset():
    # Two classes, 6 examples each; per_class 4; bases 2 examples of class 1.
    labels = np.array([0, 1] * 6)
    bases = np.array([5, 11])  # the 3rd and 6th examples of class 1
    rows = frogs_benchmark.victim_rows(labels, 1, bases, per_class=4)
    # class 0: first 4 (0, 2, 4, 6); class 1: first 4 - 2 without bases (1, 3)
    # plus the bases.
    np.testing.assert_array_equal(rows, [0, 1, 2, 3, 4, 5, 6, 11])


def test_clean_pool_rows_are_the_rows_some_victim_reads_unpoisoned():
    """Two setups over 3 classes x 4 images, 2 per class, one base each: a base is
    skipped unless the other setup trains on it clean (looped by hand)."""
    labels = np.repeat(np.arange(3), 4)  # rows 0-3 class 0, 4-7 class 1, 8-11 class 2
    specs = {
        "base_class": np.array([0, 1]),
        "base_indices": np.array([[3], [4]]),  # row 4 is clean in setup 0
    }
    pool, subsets, as_pool = frogs_benchmark.pool_and_subsets(labels, specs, 2)
    # setup 0: 0 | 3(base) | 4 5 | 8 9; setup 1: 0 1 | 4(base) 5 | 8 9
    np.testing.assert_array_equal(pool, [0, 1, 3, 4, 5, 8, 9])
    clean = frogs_benchmark.clean_pool_rows(subsets, as_pool(specs["base_indices"]), 7)
    np.testing.assert_array_equal(pool[clean], [0, 1, 4, 5, 8, 9])  # not row 3
    filled = frogs_benchmark.scatter_rows(np.ones((6, 2), np.float32), clean, 7)
    np.testing.assert_array_equal(np.asarray(filled)[:, 0], [1, 1, 0, 1, 1, 1, 1])


def test_setups_ship_with_the_package():
    specs = frogs_benchmark.load_setups("", 100)
    assert specs["base_indices"].shape == (100, 25)
    assert np.all(specs["base_class"] != specs["target_class"])


def test_too_many_setups_raises():
    with pytest.raises(UserInputError, match="num_setups=101"):
        frogs_benchmark.load_setups("", 101)


@pytest.mark.realdata
def test_runlocal_end_to_end(cifar_tfds_dir, tmp_path):
    config = load_config("frogs_benchmark.py", "runlocal,setups=2")
    config.data_dir = cifar_tfds_dir
    summary = frogs_benchmark.run(config, str(tmp_path))
    rows = [
        json.loads(x) for x in (tmp_path / "results.jsonl").read_text().split("\n") if x
    ]
    assert len(rows) == summary["success"]["n"] == 2
    # 8/255 ball, then 8-bit truncation as the benchmark saves poisons: its own
    # poison_test.py accepts up to 9/255.
    assert all(r["max_perturbation"] <= 9 / 255 + 1e-6 for r in rows)
    assert all(r["clean_accuracy"] > 0.7 for r in rows)
    poisons = load_poisons_npz(str(tmp_path / "poisons.npz"))
    assert poisons["poisons"].shape == (2, 25, 32, 32, 3)
    setup0 = load_benchmark_format(str(tmp_path / "benchmark_format" / "setup_000"))
    np.testing.assert_array_equal(setup0["poisons"], poisons["poisons"][0])
    np.testing.assert_array_equal(setup0["base_indices"], poisons["base_indices"][0])
    assert (tmp_path / "results.png").stat().st_size > 0
