"""Poisons round-trip through our npz and the poisoning benchmark's pickle format."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

from jaxpoison import UserInputError
from jaxpoison.attacks import interop


def test_to_uint8_truncates_like_to_pil_image():
    x = np.array([0.0, 0.5, 1.0, 0.999])
    np.testing.assert_array_equal(interop.to_uint8(x), [0, 127, 255, 254])


def test_benchmark_format_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    poisons = rng.integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
    target = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
    interop.save_benchmark_format(
        str(tmp_path), poisons, 5, np.array([7, 8, 9]), target, 2
    )
    back = interop.load_benchmark_format(str(tmp_path))
    np.testing.assert_array_equal(back["poisons"], poisons)
    np.testing.assert_array_equal(back["poison_labels"], [5, 5, 5])
    np.testing.assert_array_equal(back["base_indices"], [7, 8, 9])
    np.testing.assert_array_equal(back["target_image"], target)
    assert back["target_label"] == 2


def test_written_pickles_have_the_benchmark_layout(tmp_path):
    poisons = np.zeros((2, 32, 32, 3), np.uint8)
    interop.save_benchmark_format(
        str(tmp_path), poisons, 1, np.array([3, 4]), poisons[0], 0
    )
    with open(tmp_path / "poisons.pickle", "rb") as f:
        tuples = pickle.load(f)
    assert isinstance(tuples, list) and len(tuples) == 2
    image, label = tuples[0]
    assert isinstance(image, Image.Image) and image.size == (32, 32) and label == 1


def test_npz_round_trip_quantises_float_poisons(tmp_path):
    poisons = np.full((1, 2, 32, 32, 3), 0.5, np.float32)
    path = str(tmp_path / "poisons.npz")
    interop.save_poisons_npz(path, poisons=poisons, base_indices=np.array([[1, 2]]))
    back = interop.load_poisons_npz(path)
    assert back["poisons"].dtype == np.uint8 and int(back["poisons"].max()) == 127
    np.testing.assert_array_equal(back["base_indices"], [[1, 2]])


def test_missing_benchmark_folder_raises(tmp_path):
    with pytest.raises(UserInputError, match="not a poisoning-benchmark folder"):
        interop.load_benchmark_format(str(tmp_path))


def test_chunk_poisons_merge_and_export_per_setup(tmp_path):
    rng = np.random.default_rng(1)
    test_images = rng.integers(0, 256, (5, 32, 32, 3)).astype(np.uint8)
    for first in (0, 2):  # two chunks of two setups, in file-name order
        interop.save_poisons_npz(
            str(tmp_path / "poisons" / f"setups_{first:05d}.npz"),
            poisons=np.full((2, 1, 32, 32, 3), first, np.uint8),
            setup=np.array([first, first + 1]),
            base_indices=np.array([[10 + first], [11 + first]]),
            target_indices=np.array([first, first + 1]),
            base_class=np.array([1, 1]),
            target_class=np.array([2, 2]),
        )
    merged = interop.merge_poisons_npz(str(tmp_path / "poisons"))
    np.testing.assert_array_equal(merged["setup"], [0, 1, 2, 3])
    np.testing.assert_array_equal(merged["poisons"][:, 0, 0, 0, 0], [0, 0, 2, 2])
    interop.save_benchmark_setups(str(tmp_path / "bf"), merged, test_images)
    setup3 = interop.load_benchmark_format(str(tmp_path / "bf" / "setup_003"))
    np.testing.assert_array_equal(setup3["base_indices"], [13])
    np.testing.assert_array_equal(setup3["target_image"], test_images[3])
    assert setup3["target_label"] == 2
    with pytest.raises(UserInputError, match="no poisons"):
        interop.merge_poisons_npz(str(tmp_path / "bf"))


def test_triggered_target_gets_its_patch_pasted(tmp_path):
    """A backdoor's target.pickle (image, label, patch (3, 5, 5), [x, y]): the
    patch lands at rows y.., columns x.. (poison_test.py's slicing)."""
    interop.save_benchmark_format(
        str(tmp_path),
        np.zeros((2, 8, 8, 3), np.uint8),
        1,
        np.array([3, 4]),
        np.full((8, 8, 3), 100, np.uint8),
        7,
    )
    patch = np.ones((3, 5, 5), np.float32)
    patch[0] = 0.0
    image = Image.fromarray(np.full((8, 8, 3), 100, np.uint8))
    with open(tmp_path / "target.pickle", "wb") as f:
        pickle.dump((image, 7, patch, [2, 1]), f)
    got = interop.load_benchmark_format(str(tmp_path))
    assert got["patched"] and got["target_label"] == 7
    expected = np.full((8, 8, 3), 100, np.uint8)
    expected[1:6, 2:7] = [0, 255, 255]
    np.testing.assert_array_equal(got["target_image"], expected)
    with open(tmp_path / "target.pickle", "wb") as f:
        pickle.dump((image, 7, patch, [4, 4]), f)
    with pytest.raises(UserInputError, match="does not fit"):
        interop.load_benchmark_format(str(tmp_path))
