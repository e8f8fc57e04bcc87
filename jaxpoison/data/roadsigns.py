"""Road signs: a tensorflow-datasets builder and numpy loaders.

The data is Kaggle's "Road Sign Detection" by andrewmvd (CC0): PNG images with one
Pascal VOC XML annotation each, laid out as ``images/roadN.png`` and
``annotations/roadN.xml``. tensorflow-datasets has no builder for it, so this module
defines one, :class:`RoadSigns` (registered as ``road_signs``), that reads the files
from a manual dir. It has two configs:

* ``full``: one example per image (RGB, its own size) with every annotated object
  (label and normalised ``[ymin, xmin, ymax, xmax]`` box).
* ``crops``: one example per object, a square window around the object resized to
  ``crop_size`` x ``crop_size`` (32 by default), with the object's box inside the
  crop, its source file and its index among that file's objects. Other sizes are
  custom configs made by :func:`crops_config`.

Examples keep a deterministic order: files sorted by the number ``N`` in ``roadN``,
objects in annotation order. The dataset has no official split, so there is one
split, ``train``; the library splits it later.

:func:`load_roadsigns` and :func:`load_roadsign_crops` prepare the dataset once into a
tfds data dir and return plain numpy arrays.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from jaxpoison.errors import UserInputError

CLASS_NAMES: tuple[str, ...] = ("trafficlight", "stop", "speedlimit", "crosswalk")
"""Class names in label order (label ``i`` is ``CLASS_NAMES[i]``)."""

DEFAULT_CROP_SIZE = 32
"""Side in pixels of the crops of the ``crops`` config."""

DEFAULT_CROP_CONTEXT = 0.15
"""Margin around an object in a crop, as a fraction of the object's longer side."""

_EXPECTED_LAYOUT = (
    "images/roadN.png and annotations/roadN.xml (Kaggle 'Road Sign Detection' "
    "by andrewmvd, Pascal VOC)"
)

KAGGLE_URL = "https://www.kaggle.com/datasets/andrewmvd/road-sign-detection"
"""Where to get the archive (a free Kaggle account; CC0)."""

_MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download "Road Sign Detection" by andrewmvd from Kaggle
(https://www.kaggle.com/datasets/andrewmvd/road-sign-detection) and extract it so
that the manual dir holds its two folders as they are:

    <manual_dir>/images/road0.png ... road876.png
    <manual_dir>/annotations/road0.xml ... road876.xml   (Pascal VOC)

Then pass that folder as the manual dir, e.g.
`tfds.download.DownloadConfig(manual_dir=...)` or
`jaxpoison.data.roadsigns.load_roadsigns(data_dir, manual_dir)`, or the command
line's `--manual_dir DIR`.
"""


@dataclasses.dataclass(eq=False)
class RoadSignsConfig(tfds.core.BuilderConfig):
    """Config of :class:`RoadSigns`.

    Attributes:
        crop_size: 0 for whole images (one example per image); a positive side in
            pixels for one square crop per object.
        context: Margin added on each side of an object before cropping, as a
            fraction of the object's longer side. Only used when ``crop_size > 0``.
    """

    crop_size: int = 0
    context: float = DEFAULT_CROP_CONTEXT


def crops_config(crop_size: int = DEFAULT_CROP_SIZE) -> RoadSignsConfig | str:
    """The builder config for object crops of a given size.

    Args:
        crop_size: Side of the square crops in pixels.

    Returns:
        ``"crops"`` (the predefined config) for the default size, else a custom
        :class:`RoadSignsConfig` named ``crops_<size>`` (prepared in its own
        folder of the data dir).

    Raises:
        UserInputError: If ``crop_size`` is not a positive integer.
    """
    if isinstance(crop_size, bool) or not isinstance(crop_size, int | np.integer):
        raise UserInputError(f"crop_size must be a positive integer, got {crop_size!r}")
    if crop_size <= 0:
        raise UserInputError(f"crop_size must be a positive integer, got {crop_size}")
    if crop_size == DEFAULT_CROP_SIZE:
        return "crops"
    return RoadSignsConfig(
        name=f"crops_{int(crop_size)}",
        crop_size=int(crop_size),
        description=f"One {crop_size}x{crop_size} crop per object.",
    )


class _Object(NamedTuple):
    label: int
    box: tuple[float, float, float, float]  # pixels: ymin, xmin, ymax, xmax


class _Record(NamedTuple):
    stem: str
    image_path: Path
    width: int
    height: int
    objects: tuple[_Object, ...]


def check_manual_dir(manual_dir: str | os.PathLike[str]) -> Path:
    """Checks that a folder has the Kaggle road-sign layout.

    Args:
        manual_dir: Folder expected to hold ``images/`` and ``annotations/``.

    Returns:
        The folder as an absolute, user-expanded path.

    Raises:
        UserInputError: If the folder is missing, or lacks PNG images or XML
            annotations. The message is one line naming the path.
    """
    path = Path(manual_dir).expanduser().absolute()
    if not path.is_dir():
        raise UserInputError(
            f"road-sign manual dir {path} does not exist; expected {_EXPECTED_LAYOUT}"
        )
    images, annotations = path / "images", path / "annotations"
    if not (images.is_dir() and any(images.glob("*.png"))) or not (
        annotations.is_dir() and any(annotations.glob("*.xml"))
    ):
        raise UserInputError(
            f"road-sign manual dir {path} is empty or incomplete; "
            f"expected {_EXPECTED_LAYOUT}"
        )
    return path


def _sort_key(stem: str) -> tuple[float, str]:
    match = re.fullmatch(r"road(\d+)", stem)
    return (int(match.group(1)) if match else math.inf, stem)


def _parse_annotation(xml_path: Path, image_path: Path) -> _Record:
    """Parses one Pascal VOC file; boxes are kept in pixels (0-based, continuous)."""
    try:
        root = ET.parse(xml_path).getroot()
        width = int(float(root.findtext("size/width")))
        height = int(float(root.findtext("size/height")))
        objects = []
        for obj in root.iter("object"):
            name = obj.findtext("name").strip()
            box = obj.find("bndbox")
            xmin, ymin, xmax, ymax = (
                float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")
            )
            if name not in CLASS_NAMES:
                raise UserInputError(
                    f"road-sign annotation {xml_path} has unknown label {name!r}; "
                    f"expected one of {', '.join(CLASS_NAMES)}"
                )
            objects.append(_Object(CLASS_NAMES.index(name), (ymin, xmin, ymax, xmax)))
    except (ET.ParseError, AttributeError, TypeError, ValueError) as e:
        if isinstance(e, UserInputError):
            raise
        raise UserInputError(
            f"road-sign annotation {xml_path} is not valid Pascal VOC "
            f"({type(e).__name__}: {e})".replace("\n", " ")
        ) from None
    return _Record(xml_path.stem, image_path, width, height, tuple(objects))


def _read_records(manual_dir: Path) -> list[_Record]:
    """All annotations of the manual dir, sorted by N in roadN."""
    records = []
    xml_paths = sorted(
        (manual_dir / "annotations").glob("*.xml"), key=lambda p: _sort_key(p.stem)
    )
    for xml_path in xml_paths:
        image_path = manual_dir / "images" / f"{xml_path.stem}.png"
        if not image_path.is_file():
            raise UserInputError(
                f"road-sign image {image_path} is missing for annotation {xml_path}"
            )
        records.append(_parse_annotation(xml_path, image_path))
    return records


def _load_rgb(path: Path) -> Image.Image:
    """Opens an image as RGB: paletted images go through RGBA; alpha is dropped.

    Dropping alpha (rather than blending onto a background) keeps the stored
    colours; in this dataset alpha is below 255 only along some image borders.
    """
    with Image.open(path) as im:
        im.load()
        if im.mode == "P":
            im = im.convert("RGBA")
        return im.convert("RGB") if im.mode != "RGB" else im.copy()


def _png(image: Image.Image) -> io.BytesIO:
    """Encodes with Pillow, several times faster than tfds' own ``encode_png``."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    buf.seek(0)
    return buf


def _normalised_box(
    box: tuple[float, float, float, float], height: float, width: float
) -> np.ndarray:
    ymin, xmin, ymax, xmax = box
    out = np.array([ymin / height, xmin / width, ymax / height, xmax / width])
    out = np.clip(out, 0.0, 1.0)
    # Guard against inverted boxes in hand-made annotations.
    out[2], out[3] = max(out[0], out[2]), max(out[1], out[3])
    return out.astype(np.float32)


def _crop_window(
    box: tuple[float, float, float, float], height: int, width: int, context: float
) -> tuple[float, float, float, float]:
    """Square window (ymin, xmin, ymax, xmax, in pixels) around an object.

    The side is the object's longer side times ``1 + 2 * context``; the window is
    centred on the object, then shifted to lie inside the image. Where the image is
    narrower than the side, the window spans that whole dimension instead, so the
    crop is not square and the resize stretches it slightly; no pixels are padded.
    """
    ymin, xmin, ymax, xmax = box
    side = max(ymax - ymin, xmax - xmin, 1.0) * (1.0 + 2.0 * context)

    def span(lo: float, hi: float, limit: int) -> tuple[float, float]:
        length = min(side, float(limit))
        start = (lo + hi) / 2.0 - length / 2.0
        start = min(max(start, 0.0), limit - length)
        return start, start + length

    y0, y1 = span(ymin, ymax, height)
    x0, x1 = span(xmin, xmax, width)
    return y0, x0, y1, x1


class RoadSigns(tfds.core.GeneratorBasedBuilder):
    """Kaggle "Road Sign Detection" (andrewmvd), read from a manual dir.

    Config ``full`` has one example per image: ``image`` (uint8 RGB, own size),
    ``image/filename`` and ``objects`` (a sequence of ``label`` and ``bbox``, every
    annotated object). Config ``crops`` has one example per object: ``image``
    (``crop_size`` square), ``label``, ``bbox`` (the object within the crop),
    ``image/filename``, ``image/index`` (position of the source image in ``full``)
    and ``object/index`` (the object's index within its image). Boxes are tfds
    normalised ``[ymin, xmin, ymax, xmax]``.
    """

    name = "road_signs"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS
    BUILDER_CONFIGS = [
        RoadSignsConfig(
            name="full", description="One example per image, with all its objects."
        ),
        RoadSignsConfig(
            name="crops",
            crop_size=DEFAULT_CROP_SIZE,
            description=(
                f"One {DEFAULT_CROP_SIZE}x{DEFAULT_CROP_SIZE} crop per object, "
                "with the object's box inside the crop."
            ),
        ),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "full"

    def _info(self) -> tfds.core.DatasetInfo:
        label = tfds.features.ClassLabel(names=list(CLASS_NAMES))
        size = self.builder_config.crop_size
        if size > 0:
            features = tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(size, size, 3), dtype=np.uint8),
                    "label": label,
                    "bbox": tfds.features.BBoxFeature(),
                    "image/filename": tfds.features.Text(),
                    "image/index": tfds.features.Scalar(dtype=np.int32),
                    "object/index": tfds.features.Scalar(dtype=np.int32),
                }
            )
            supervised_keys = ("image", "label")
        else:
            features = tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
                    "image/filename": tfds.features.Text(),
                    "objects": tfds.features.Sequence(
                        {"label": label, "bbox": tfds.features.BBoxFeature()}
                    ),
                }
            )
            supervised_keys = None
        return self.dataset_info_from_configs(
            description=(
                "Road Sign Detection (Kaggle, andrewmvd, CC0): PNG images with "
                "Pascal VOC boxes of traffic lights, stop signs, speed limits and "
                "crosswalks."
            ),
            features=features,
            supervised_keys=supervised_keys,
            homepage="https://www.kaggle.com/datasets/andrewmvd/road-sign-detection",
            # Keep the generator's order (sorted by N in roadN) instead of tfds'
            # hash-of-key order.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        try:
            manual_dir = dl_manager.manual_dir
        except AssertionError:
            # tfds raises AssertionError with multi-line instructions for a
            # missing or empty manual dir; report one line instead.
            path = getattr(dl_manager, "_manual_dir", None) or "(none given)"
            raise UserInputError(
                f"road_signs is not prepared and the manual dir {path} does not "
                f"exist or is empty: download {KAGGLE_URL}, extract it and pass "
                f"--manual_dir DIR (manual_dir= in Python); expected {_EXPECTED_LAYOUT}"
            ) from None
        manual_dir = check_manual_dir(os.fspath(manual_dir))
        return {"train": self._generate_examples(manual_dir)}

    def _generate_examples(self, manual_dir: Path) -> Iterator[tuple[str, dict]]:
        config = self.builder_config
        for image_index, record in enumerate(_read_records(manual_dir)):
            image = _load_rgb(record.image_path)
            # Trust the pixels over the XML <size> (they agree in this dataset).
            width, height = image.size
            sx, sy = width / record.width, height / record.height
            objects = [
                _Object(
                    o.label,
                    (o.box[0] * sy, o.box[1] * sx, o.box[2] * sy, o.box[3] * sx),
                )
                for o in record.objects
            ]
            filename = record.image_path.name
            if config.crop_size <= 0:
                yield (
                    record.stem,
                    {
                        "image": _png(image),
                        "image/filename": filename,
                        "objects": [
                            {
                                "label": o.label,
                                "bbox": _normalised_box(o.box, height, width),
                            }
                            for o in objects
                        ],
                    },
                )
                continue
            for object_index, obj in enumerate(objects):
                y0, x0, y1, x1 = _crop_window(obj.box, height, width, config.context)
                crop = image.resize(
                    (config.crop_size, config.crop_size),
                    resample=Image.Resampling.BILINEAR,
                    box=(x0, y0, x1, y1),
                )
                ymin, xmin, ymax, xmax = obj.box
                inner = (ymin - y0, xmin - x0, ymax - y0, xmax - x0)
                yield (
                    f"{record.stem}_{object_index}",
                    {
                        "image": _png(crop),
                        "label": obj.label,
                        "bbox": _normalised_box(inner, y1 - y0, x1 - x0),
                        "image/filename": filename,
                        "image/index": image_index,
                        "object/index": object_index,
                    },
                )


class RoadSignArrays(NamedTuple):
    """Whole road-sign images as numpy arrays (N images, M objects in all).

    Attributes:
        images: uint8 ``(N, S, S, 3)``, each whole image resized to ``S x S``
            (aspect ratio not kept, so normalised boxes stay valid).
        labels: int32 ``(N,)``, the label of the image's largest object (largest
            box area in pixels; the first in annotation order on ties). Every
            image of the Kaggle set has at least one object; an image without
            any would get -1.
        boxes: float32 ``(N, 4)``, that largest object's normalised
            ``[ymin, xmin, ymax, xmax]`` (zeros for an image without objects).
        object_image_index: int32 ``(M,)``, the image of each object.
        object_labels: int32 ``(M,)``, every object's label.
        object_boxes: float32 ``(M, 4)``, every object's normalised box.
        filenames: the N source file names (``roadN.png``), in order.
        class_names: label names, ``CLASS_NAMES``.
    """

    images: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray
    object_image_index: np.ndarray
    object_labels: np.ndarray
    object_boxes: np.ndarray
    filenames: tuple[str, ...]
    class_names: tuple[str, ...]


class RoadSignCrops(NamedTuple):
    """One crop per road-sign object as numpy arrays (M objects).

    Attributes:
        images: uint8 ``(M, S, S, 3)``, square windows around each object (see
            :func:`_crop_window`), resized to ``S x S`` with Pillow bilinear.
        labels: int32 ``(M,)``, the object's label.
        boxes: float32 ``(M, 4)``, the object's normalised box within its crop.
        image_index: int32 ``(M,)``, the source image's position in
            :func:`load_roadsigns` order.
        object_index: int32 ``(M,)``, the object's index within its image.
        filenames: the M source file names (``roadN.png``).
        class_names: label names, ``CLASS_NAMES``.
    """

    images: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray
    image_index: np.ndarray
    object_index: np.ndarray
    filenames: tuple[str, ...]
    class_names: tuple[str, ...]


def _prepared_builder(
    config: RoadSignsConfig | str,
    data_dir: str | os.PathLike[str] | None,
    manual_dir: str | os.PathLike[str] | None,
) -> RoadSigns:
    """A :class:`RoadSigns` builder, prepared into ``data_dir`` if not yet.

    ``manual_dir`` None: ``$JAXPOISON_MANUAL_DIR`` (the CLI's ``--manual_dir``), else
    tfds' default ``<data_dir>/downloads/manual``.
    """
    from jaxpoison.data.cifar import MANUAL_DIR_ENV

    if manual_dir is None:
        manual_dir = os.environ.get(MANUAL_DIR_ENV) or None
    if manual_dir is not None:
        manual_dir = check_manual_dir(manual_dir)
    if data_dir is not None and "://" not in os.fspath(data_dir):
        # Local paths expand "~"; bucket paths (gs://...) go to tfds untouched.
        data_dir = os.fspath(Path(data_dir).expanduser())
    builder = RoadSigns(config=config, data_dir=data_dir)
    if not builder.is_prepared():
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
        )
    return builder


def _check_image_size(image_size: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int | np.integer):
        raise UserInputError(
            f"image_size must be a positive integer, got {image_size!r}"
        )
    if image_size <= 0:
        raise UserInputError(f"image_size must be a positive integer, got {image_size}")
    return int(image_size)


def _resize_uint8(image: tf.Tensor, size: int) -> tf.Tensor:
    """Bilinear, antialiased resize to ``size x size``, rounded back to uint8."""
    out = tf.image.resize(image, (size, size), method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


def load_roadsigns(
    data_dir: str | os.PathLike[str] | None,
    manual_dir: str | os.PathLike[str] | None,
    image_size: int = 64,
) -> RoadSignArrays:
    """Loads the whole road-sign images as arrays, preparing the dataset if needed.

    Builds :class:`RoadSigns` (config ``full``) into ``data_dir`` from
    ``manual_dir`` once, then reads it with ``as_dataset`` and ``tfds.as_numpy``.
    Each image is resized to ``image_size`` x ``image_size`` (bilinear with
    antialiasing, aspect ratio not kept).

    Args:
        data_dir: tfds data dir; None for tfds' default (``$TFDS_DATA_DIR`` or
            ``~/tensorflow_datasets``).
        manual_dir: Folder with ``images/`` and ``annotations/``. May be None if
            the dataset is already prepared in ``data_dir`` (otherwise tfds'
            default ``<data_dir>/downloads/manual`` is tried).
        image_size: Side ``S`` of the returned images.

    Returns:
        A :class:`RoadSignArrays`, images in order of N in ``roadN``.

    Raises:
        UserInputError: If ``manual_dir`` is given but missing or empty, or the
            dataset is unprepared and no usable manual dir is found, or an
            annotation is malformed, or ``image_size`` is not positive.
    """
    size = _check_image_size(image_size)
    builder = _prepared_builder("full", data_dir, manual_dir)
    ds = builder.as_dataset(split="train", shuffle_files=False)
    ds = ds.map(
        lambda ex: {
            "image": _resize_uint8(ex["image"], size),
            "image/filename": ex["image/filename"],
            "labels": ex["objects"]["label"],
            "bboxes": ex["objects"]["bbox"],
        },
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    images, labels, boxes, filenames = [], [], [], []
    obj_image, obj_labels, obj_boxes = [], [], []
    for i, ex in enumerate(tfds.as_numpy(ds)):
        ex_labels = np.asarray(ex["labels"], np.int32)
        ex_boxes = np.asarray(ex["bboxes"], np.float32).reshape(-1, 4)
        images.append(ex["image"])
        filenames.append(ex["image/filename"].decode())
        obj_image.append(np.full(len(ex_labels), i, np.int32))
        obj_labels.append(ex_labels)
        obj_boxes.append(ex_boxes)
        if len(ex_labels):
            area = (ex_boxes[:, 2] - ex_boxes[:, 0]) * (ex_boxes[:, 3] - ex_boxes[:, 1])
            k = int(np.argmax(area))
            labels.append(ex_labels[k])
            boxes.append(ex_boxes[k])
        else:
            labels.append(-1)
            boxes.append(np.zeros(4, np.float32))
    return RoadSignArrays(
        images=np.stack(images).astype(np.uint8),
        labels=np.asarray(labels, np.int32),
        boxes=np.stack(boxes).astype(np.float32),
        object_image_index=np.concatenate(obj_image).astype(np.int32),
        object_labels=np.concatenate(obj_labels).astype(np.int32),
        object_boxes=np.concatenate(obj_boxes).astype(np.float32).reshape(-1, 4),
        filenames=tuple(filenames),
        class_names=CLASS_NAMES,
    )


def load_roadsign_crops(
    data_dir: str | os.PathLike[str] | None,
    manual_dir: str | os.PathLike[str] | None,
    crop_size: int = DEFAULT_CROP_SIZE,
) -> RoadSignCrops:
    """Loads one crop per road-sign object as arrays, preparing them if needed.

    Builds :class:`RoadSigns` with the ``crops`` config (or a custom
    ``crops_<size>`` config for another ``crop_size``) into ``data_dir`` once, then
    reads it with ``as_dataset`` and ``tfds.as_numpy``.

    Args:
        data_dir: tfds data dir; None for tfds' default (``$TFDS_DATA_DIR`` or
            ``~/tensorflow_datasets``).
        manual_dir: Folder with ``images/`` and ``annotations/``; may be None if
            these crops are already prepared in ``data_dir``.
        crop_size: Side of the square crops in pixels.

    Returns:
        A :class:`RoadSignCrops`, ordered by source image then object index.

    Raises:
        UserInputError: If ``manual_dir`` is given but missing or empty, or the
            crops are unprepared and no usable manual dir is found, or an
            annotation is malformed, or ``crop_size`` is not positive.
    """
    config = crops_config(crop_size)
    builder = _prepared_builder(config, data_dir, manual_dir)
    ds = builder.as_dataset(split="train", shuffle_files=False)
    n = builder.info.splits["train"].num_examples
    batch = next(iter(tfds.as_numpy(ds.batch(max(n, 1)))))
    return RoadSignCrops(
        images=np.asarray(batch["image"], np.uint8),
        labels=np.asarray(batch["label"], np.int32),
        boxes=np.asarray(batch["bbox"], np.float32),
        image_index=np.asarray(batch["image/index"], np.int32),
        object_index=np.asarray(batch["object/index"], np.int32),
        filenames=tuple(f.decode() for f in batch["image/filename"]),
        class_names=CLASS_NAMES,
    )
