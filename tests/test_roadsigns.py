"""Tests of the road-sign tfds builder and its array loaders."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from jaxpoison.data import roadsigns
from jaxpoison.errors import UserInputError

NUM_IMAGES = 877
OBJECT_COUNTS = {"trafficlight": 170, "stop": 91, "speedlimit": 783, "crosswalk": 200}


# ----------------------------------------------------------------------------
# A tiny synthetic manual dir: no real data needed.
# ----------------------------------------------------------------------------


def _write_xml(path: Path, width: int, height: int, objects) -> None:
    objs = "".join(
        f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0"
        f"</truncated><occluded>0</occluded><difficult>0</difficult><bndbox>"
        f"<xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax>"
        "</bndbox></object>"
        for name, (x0, y0, x1, y1) in objects
    )
    path.write_text(
        f"<annotation><folder>images</folder><filename>{path.stem}.png</filename>"
        f"<size><width>{width}</width><height>{height}</height><depth>3</depth>"
        f"</size><segmented>0</segmented>{objs}</annotation>"
    )


@pytest.fixture(scope="session")
def tiny_manual_dir(tmp_path_factory) -> Path:
    """Three images: RGBA, paletted with transparency, RGB; named to test sorting."""
    root = tmp_path_factory.mktemp("roadsigns_manual")
    (root / "images").mkdir()
    (root / "annotations").mkdir()
    rgba = np.zeros((20, 40, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128  # red, half transparent
    Image.fromarray(rgba, "RGBA").save(root / "images" / "road10.png")
    _write_xml(
        root / "annotations" / "road10.xml",
        40,
        20,
        [("stop", (4, 2, 20, 10)), ("crosswalk", (0, 0, 40, 20))],
    )
    pal = Image.new("P", (30, 30))
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.paste(1, (0, 0, 30, 15))
    pal.info["transparency"] = 0
    pal.save(root / "images" / "road2.png", transparency=0)
    _write_xml(
        root / "annotations" / "road2.xml", 30, 30, [("speedlimit", (3, 6, 9, 30))]
    )
    Image.new("RGB", (16, 24), (0, 0, 255)).save(root / "images" / "road0.png")
    _write_xml(
        root / "annotations" / "road0.xml", 16, 24, [("trafficlight", (2, 4, 10, 20))]
    )
    return root


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tfds_tiny")


def test_tiny_builder_full(tiny_manual_dir, tiny_data_dir):
    builder = roadsigns.RoadSigns(config="full", data_dir=os.fspath(tiny_data_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=tiny_manual_dir)
    )
    assert builder.name == "road_signs"
    assert str(builder.version) == "1.0.0"
    assert builder.info.features["objects"]["label"].names == list(
        roadsigns.CLASS_NAMES
    )
    examples = list(tfds.as_numpy(builder.as_dataset(split="train")))
    # Sorted by the number in roadN, not as strings (road10 after road2).
    assert [ex["image/filename"] for ex in examples] == [
        b"road0.png",
        b"road2.png",
        b"road10.png",
    ]
    for ex in examples:
        assert ex["image"].dtype == np.uint8 and ex["image"].shape[-1] == 3
    assert examples[0]["image"].shape == (24, 16, 3)
    np.testing.assert_array_equal(examples[0]["image"][0, 0], [0, 0, 255])
    assert examples[1]["image"].shape == (30, 30, 3)
    np.testing.assert_array_equal(examples[1]["image"][0, 0], [0, 255, 0])
    np.testing.assert_array_equal(examples[1]["image"][-1, -1], [0, 0, 0])
    # RGBA: alpha dropped, colour kept.
    np.testing.assert_array_equal(examples[2]["image"][5, 5], [200, 0, 0])
    objects = examples[2]["objects"]
    np.testing.assert_array_equal(objects["label"], [1, 3])
    np.testing.assert_allclose(
        objects["bbox"], [[0.1, 0.1, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0]], atol=1e-6
    )


def test_tiny_loaders(tiny_manual_dir, tiny_data_dir):
    arrays = roadsigns.load_roadsigns(tiny_data_dir, tiny_manual_dir, image_size=8)
    assert arrays.images.shape == (3, 8, 8, 3) and arrays.images.dtype == np.uint8
    assert arrays.filenames == ("road0.png", "road2.png", "road10.png")
    # Largest object decides the image label: crosswalk covers all of road10.
    np.testing.assert_array_equal(arrays.labels, [0, 2, 3])
    np.testing.assert_allclose(arrays.boxes[2], [0, 0, 1, 1])
    np.testing.assert_array_equal(arrays.object_image_index, [0, 1, 2, 2])
    np.testing.assert_array_equal(arrays.object_labels, [0, 2, 1, 3])
    assert arrays.object_boxes.shape == (4, 4)
    assert arrays.object_boxes.dtype == np.float32
    np.testing.assert_array_equal(arrays.images[0, ..., 2], 255)

    crops = roadsigns.load_roadsign_crops(tiny_data_dir, tiny_manual_dir, crop_size=6)
    assert crops.images.shape == (4, 6, 6, 3)
    np.testing.assert_array_equal(crops.labels, arrays.object_labels)
    np.testing.assert_array_equal(crops.image_index, [0, 1, 2, 2])
    np.testing.assert_array_equal(crops.object_index, [0, 0, 0, 1])
    assert crops.filenames == ("road0.png", "road2.png", "road10.png", "road10.png")
    _check_boxes(crops.boxes)
    # An object filling its image: the window is the whole image.
    np.testing.assert_allclose(crops.boxes[3], [0, 0, 1, 1])
    # The stop sign (16x8 px at x 4..20, y 2..10) gets a 20.8 px wide window
    # centred on it (x 1.6..22.4); the image is only 20 px tall, so the window
    # spans its whole height.
    np.testing.assert_allclose(
        crops.boxes[2], [0.1, 2.4 / 20.8, 0.5, 18.4 / 20.8], atol=1e-5
    )

    # Prepared once: a second call needs no manual dir.
    again = roadsigns.load_roadsigns(tiny_data_dir, None, image_size=8)
    np.testing.assert_array_equal(again.images, arrays.images)


def _check_boxes(boxes: np.ndarray) -> None:
    assert boxes.dtype == np.float32 and boxes.shape[1:] == (4,)
    assert np.all((boxes >= 0) & (boxes <= 1))
    assert np.all(boxes[:, 0] < boxes[:, 2])
    assert np.all(boxes[:, 1] < boxes[:, 3])


def _assert_one_line(err: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(err.value)
    assert "\n" not in message
    for part in parts:
        assert part in message


def test_missing_manual_dir_raises(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(UserInputError) as err:
        roadsigns.load_roadsigns(tmp_path / "tfds", missing)
    _assert_one_line(err, str(missing), "images/roadN.png")
    with pytest.raises(UserInputError) as err:
        roadsigns.load_roadsign_crops(tmp_path / "tfds", missing)
    _assert_one_line(err, str(missing))


def test_manual_dir_flag_is_the_default_manual_dir(tmp_path, monkeypatch):
    """The CLI's --manual_dir sets $JAXPOISON_MANUAL_DIR, which the loaders read."""
    missing = tmp_path / "from_the_flag"
    monkeypatch.setenv("JAXPOISON_MANUAL_DIR", str(missing))
    with pytest.raises(UserInputError) as err:
        roadsigns.load_roadsigns(tmp_path / "tfds", None)
    _assert_one_line(err, str(missing), "images/roadN.png")


def test_empty_manual_dir_raises(tmp_path):
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    with pytest.raises(UserInputError) as err:
        roadsigns.load_roadsigns(tmp_path / "tfds", empty)
    _assert_one_line(err, str(empty), "annotations/roadN.xml")


def test_builder_without_manual_dir_raises(tmp_path):
    """Unprepared and no manual dir: tfds' default manual dir is empty."""
    with pytest.raises(UserInputError) as err:
        roadsigns.load_roadsigns(tmp_path / "tfds", None)
    _assert_one_line(err, str(tmp_path / "tfds"), "does not exist or is empty")
    _assert_one_line(err, "--manual_dir", roadsigns.KAGGLE_URL)
    builder = roadsigns.RoadSigns(data_dir=os.fspath(tmp_path / "tfds2"))
    with pytest.raises(UserInputError):
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                manual_dir=tmp_path / "nothing_here"
            )
        )


def test_unknown_label_raises(tmp_path):
    manual = tmp_path / "manual"
    (manual / "images").mkdir(parents=True)
    (manual / "annotations").mkdir()
    Image.new("RGB", (8, 8)).save(manual / "images" / "road0.png")
    _write_xml(manual / "annotations" / "road0.xml", 8, 8, [("yield", (1, 1, 4, 4))])
    with pytest.raises(UserInputError) as err:
        roadsigns.load_roadsigns(tmp_path / "tfds", manual)
    _assert_one_line(err, "road0.xml", "'yield'")


@pytest.mark.parametrize("size", [0, -3, 2.5, True])
def test_bad_sizes_raise(tmp_path, size):
    with pytest.raises(UserInputError):
        roadsigns.load_roadsigns(tmp_path, tmp_path, image_size=size)
    with pytest.raises(UserInputError):
        roadsigns.load_roadsign_crops(tmp_path, tmp_path, crop_size=size)


def test_crops_config_names():
    assert roadsigns.crops_config() == "crops"
    custom = roadsigns.crops_config(48)
    assert custom.name == "crops_48" and custom.crop_size == 48
    assert [c.name for c in roadsigns.RoadSigns.BUILDER_CONFIGS] == ["full", "crops"]


# ----------------------------------------------------------------------------
# The real data set.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def real_data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tfds_real")


@pytest.fixture(scope="session")
def real_arrays(real_data_dir, shared_data) -> roadsigns.RoadSignArrays:
    """The shared road signs (skipped without them, a failure under CI=true)."""
    return roadsigns.load_roadsigns(
        real_data_dir, shared_data / "roadsigns", image_size=64
    )


@pytest.fixture(scope="session")
def real_crops(real_data_dir, shared_data) -> roadsigns.RoadSignCrops:
    return roadsigns.load_roadsign_crops(real_data_dir, shared_data / "roadsigns")


@pytest.mark.realdata
@pytest.mark.usefixtures("real_arrays")  # prepares the data dir
def test_real_builder_counts(real_data_dir):
    builder = roadsigns.RoadSigns(config="full", data_dir=os.fspath(real_data_dir))
    assert builder.is_prepared()
    assert builder.info.splits["train"].num_examples == NUM_IMAGES
    ds = builder.as_dataset(split="train", shuffle_files=False)
    counts = np.zeros(len(roadsigns.CLASS_NAMES), np.int64)
    num_images = 0
    boxes = []
    for ex in tfds.as_numpy(ds):
        num_images += 1
        assert ex["image"].ndim == 3 and ex["image"].shape[-1] == 3
        assert len(ex["objects"]["label"]) >= 1
        counts += np.bincount(ex["objects"]["label"], minlength=len(counts))
        boxes.append(ex["objects"]["bbox"])
    assert num_images == NUM_IMAGES
    assert counts.sum() == sum(OBJECT_COUNTS.values()) == 1244
    assert dict(zip(roadsigns.CLASS_NAMES, counts.tolist(), strict=True)) == (
        OBJECT_COUNTS
    )
    _check_boxes(np.concatenate(boxes))


@pytest.mark.realdata
def test_real_arrays(real_arrays):
    a = real_arrays
    assert a.images.shape == (NUM_IMAGES, 64, 64, 3) and a.images.dtype == np.uint8
    assert a.labels.shape == (NUM_IMAGES,) and a.labels.dtype == np.int32
    assert a.boxes.shape == (NUM_IMAGES, 4)
    assert a.class_names == tuple(OBJECT_COUNTS)
    assert a.filenames == tuple(f"road{i}.png" for i in range(NUM_IMAGES))
    assert a.object_labels.shape == (1244,) and a.object_labels.dtype == np.int32
    assert a.object_image_index.dtype == np.int32
    assert np.all(np.diff(a.object_image_index) >= 0)
    np.testing.assert_array_equal(
        np.bincount(a.object_labels), list(OBJECT_COUNTS.values())
    )
    _check_boxes(a.boxes)
    _check_boxes(a.object_boxes)
    # The image label and box are those of its largest object.
    area = (a.object_boxes[:, 2] - a.object_boxes[:, 0]) * (
        a.object_boxes[:, 3] - a.object_boxes[:, 1]
    )
    for i in range(NUM_IMAGES):
        (idx,) = np.nonzero(a.object_image_index == i)
        k = idx[np.argmax(area[idx])]
        assert a.labels[i] == a.object_labels[k]
        np.testing.assert_array_equal(a.boxes[i], a.object_boxes[k])
    assert 0 < a.images.mean() < 255


@pytest.mark.realdata
def test_real_crops(real_crops, real_arrays):
    c = real_crops
    assert c.images.shape == (1244, 32, 32, 3) and c.images.dtype == np.uint8
    np.testing.assert_array_equal(c.labels, real_arrays.object_labels)
    np.testing.assert_array_equal(c.image_index, real_arrays.object_image_index)
    assert c.filenames == tuple(real_arrays.filenames[i] for i in c.image_index)
    _check_boxes(c.boxes)
    # Objects sit in the middle of their crops, with some context around.
    centre_y = (c.boxes[:, 0] + c.boxes[:, 2]) / 2
    assert np.median(np.abs(centre_y - 0.5)) < 0.05
    assert np.median(c.boxes[:, 2] - c.boxes[:, 0]) < 0.95
