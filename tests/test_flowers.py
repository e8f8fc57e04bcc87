"""Tests of the flowers ImageFolder loader."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from jaxpoison.data import FLOWERS_DIR_ENV
from jaxpoison.data.flowers import FlowerArrays, load_flowers
from jaxpoison.errors import UserInputError

SHARED_DATA = Path(
    os.environ.get("JAXPOISON_SHARED_DATA")
    or Path(__file__).resolve().parents[2] / "shared" / "data"
)
FLOWERS = SHARED_DATA / "flowers"
CLASS_COUNTS = {
    "daisy": 764,
    "dandelion": 1052,
    "rose": 784,
    "sunflower": 733,
    "tulip": 984,
}


def realdata(test):
    """Marks a test as needing the shared flowers data; skips it without."""
    skip = pytest.mark.skipif(not FLOWERS.is_dir(), reason=f"no {FLOWERS}")
    return pytest.mark.realdata(skip(test))


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """Two classes; file names chosen so that sorting matters.

    ``b/z.jpg`` is 30x10: red left and right thirds, green middle square.
    ``a/2.jpg`` is grayscale (ImageFolder must still give RGB).
    """
    root = tmp_path_factory.mktemp("flowers")
    for name in ("a", "b"):
        (root / "train" / name).mkdir(parents=True)
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, :, 0] = 255
    wide[:, 10:20] = (0, 255, 0)
    Image.fromarray(wide).save(root / "train" / "b" / "z.jpg", quality=100)
    Image.new("RGB", (12, 12), (0, 0, 255)).save(root / "train" / "b" / "y.jpg")
    Image.new("L", (8, 16), 200).save(root / "train" / "a" / "2.jpg")
    Image.new("RGB", (20, 20), (255, 255, 0)).save(root / "train" / "a" / "10.jpg")
    Image.new("RGB", (9, 9), (0, 255, 255)).save(root / "train" / "a" / "1.jpg")
    return root


def test_tiny_order_and_shapes(tiny_root):
    images, labels, class_names = load_flowers(tiny_root, image_size=4)
    assert class_names == ("a", "b")
    assert images.shape == (5, 4, 4, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1])
    # By class, then file name (as strings): a/1, a/10, a/2, b/y, b/z.
    mean = images.reshape(5, -1, 3).mean(axis=1)
    np.testing.assert_allclose(mean[0], [0, 255, 255], atol=4)
    np.testing.assert_allclose(mean[1], [255, 255, 0], atol=4)
    np.testing.assert_allclose(mean[2], [200, 200, 200], atol=4)
    np.testing.assert_allclose(mean[3], [0, 0, 255], atol=4)
    # Centre crop keeps only the green middle of the wide image.
    np.testing.assert_allclose(mean[4], [0, 255, 0], atol=12)


def test_tiny_no_crop_keeps_sides(tiny_root):
    out = load_flowers(tiny_root, image_size=6, center_crop=False)
    assert isinstance(out, FlowerArrays)
    wide = out.images[4].astype(int)
    assert wide[:, 0, 0].min() > 200 and wide[:, 0, 1].max() < 60  # red left edge
    assert wide[:, 3, 1].min() > 200  # green middle


def test_missing_root_raises(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(UserInputError) as err:
        load_flowers(missing)
    message = str(err.value)
    assert "\n" not in message and str(missing) in message
    assert "train/<class>/<name>.jpg" in message


def test_root_without_images_raises(tmp_path):
    (tmp_path / "train" / "daisy").mkdir(parents=True)
    with pytest.raises(UserInputError) as err:
        load_flowers(tmp_path)
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserInputError):
        load_flowers(tmp_path, split="test")


@pytest.mark.parametrize("size", [0, -1, 3.0, False])
def test_bad_image_size_raises(tiny_root, size):
    with pytest.raises(UserInputError):
        load_flowers(tiny_root, image_size=size)


@pytest.fixture(scope="session")
def real_flowers() -> FlowerArrays:
    return load_flowers(FLOWERS, image_size=64)


@realdata
def test_real_flowers(real_flowers):
    images, labels, class_names = real_flowers
    assert class_names == tuple(CLASS_COUNTS)
    assert images.shape == (4317, 64, 64, 3) and images.dtype == np.uint8
    assert labels.shape == (4317,) and labels.dtype == np.int32
    assert dict(zip(class_names, np.bincount(labels).tolist(), strict=True)) == (
        CLASS_COUNTS
    )
    assert np.all(np.diff(labels) >= 0)  # sorted by class
    assert 20 < images.mean() < 235 and images.std() > 20


@realdata
def test_real_flowers_deterministic(real_flowers):
    """The first file of each class (by name) comes first, whatever the seed."""
    for label, name in enumerate(CLASS_COUNTS):
        path = sorted((FLOWERS / "train" / name).glob("*.jpg"))[0]
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            side = min(w, h)
            box = ((w - side) // 2, (h - side) // 2)
            crop = im.crop((*box, box[0] + side, box[1] + side)).resize(
                (64, 64), Image.Resampling.BILINEAR
            )
        index = int(np.argmax(real_flowers.labels == label))
        diff = np.abs(real_flowers.images[index].astype(int) - np.asarray(crop))
        assert diff.mean() < 6, (name, diff.mean())


def test_tf_flowers_from_the_catalog_as_arrays(tmp_path, monkeypatch):
    """tfds' `tf_flowers`: refused unprepared without download; with it, tfds'
    download_and_prepare and examples come from `tfds.testing.mock_data` (random
    images of random sizes; nothing is fetched here), resized to squares."""
    from jaxpoison.data import load_dataset

    monkeypatch.delenv("JAXPOISON_DOWNLOAD", raising=False)
    with pytest.raises(UserInputError, match="tf_flowers is not prepared.*--download"):
        load_dataset("tf_flowers", data_dir=str(tmp_path))
    with tfds.testing.mock_data(num_examples=5):
        data = load_dataset(
            "tf_flowers", data_dir=str(tmp_path), image_size=16, download=True
        )
    assert data.images.shape == (5, 16, 16, 3) and data.images.dtype == np.uint8
    assert set(data.class_names) == {
        "daisy",
        "dandelion",
        "roses",
        "sunflowers",
        "tulips",
    }
    assert data.labels.dtype == np.int32
    assert 0 <= data.labels.min() and data.labels.max() <= 4


def test_grid_reads_the_flowers_dir_from_the_environment_when_config_is_empty(
    tiny_root, monkeypatch
):
    from jaxpoison.experiments import backdoor_grid as bg

    monkeypatch.setenv(FLOWERS_DIR_ENV, str(tiny_root))
    config = bg.ml_collections.ConfigDict(dict(flowers_dir="", image_size=4))
    images, labels, class_names = bg.load_images("flowers", config)
    assert class_names == ("a", "b") and images.shape == (5, 4, 4, 3)
