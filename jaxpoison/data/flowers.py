"""Flowers: Kaggle "Flowers Recognition" as numpy arrays via tfds' ImageFolder.

The expected layout is ``root/<split>/<class>/<name>.jpg`` (the shared copy has one
split, ``train``, with 5 classes). Images are read with
``tfds.folder_dataset.ImageFolder``, centre-cropped to a square and resized, and
returned in a deterministic order: by class, then by file name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from jaxpoison.errors import UserInputError

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # what ImageFolder reads


class FlowerArrays(NamedTuple):
    """Flower images as arrays; unpacks as ``images, labels, class_names``.

    Attributes:
        images: uint8 ``(N, S, S, 3)``.
        labels: int32 ``(N,)``, indices into ``class_names``.
        class_names: class folder names, sorted (ImageFolder's label order).
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]


def _check_root(root: str | os.PathLike[str], split: str) -> Path:
    """Checks that ``root/<split>/<class>/`` holds images; returns the root."""
    path = Path(root).expanduser().absolute()
    expected = f"expected {split}/<class>/<name>.jpg under it"
    if not path.is_dir():
        raise UserInputError(f"flowers root {path} does not exist; {expected}")
    split_dir = path / split
    if not split_dir.is_dir() or not any(
        f.suffix.lower() in _IMAGE_SUFFIXES
        for d in split_dir.iterdir()
        if d.is_dir()
        for f in d.iterdir()
    ):
        raise UserInputError(f"flowers root {path} has no images; {expected}")
    return path


def _square_resize_uint8(image: tf.Tensor, size: int, center_crop: bool) -> tf.Tensor:
    """Optional central square crop, then bilinear antialiased resize to uint8."""
    if center_crop:
        shape = tf.shape(image)
        h, w = shape[0], shape[1]
        side = tf.minimum(h, w)
        image = tf.image.crop_to_bounding_box(
            image, (h - side) // 2, (w - side) // 2, side, side
        )
    out = tf.image.resize(image, (size, size), method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


def load_flowers(
    root: str | os.PathLike[str],
    image_size: int = 64,
    *,
    split: str = "train",
    center_crop: bool = True,
) -> FlowerArrays:
    """Loads a flowers ImageFolder split as arrays.

    Reads ``root`` with ``tfds.folder_dataset.ImageFolder`` (which decodes every
    image to RGB). Each image is centre-cropped to a square on its shorter side
    (unless ``center_crop`` is False, when the aspect ratio is not kept), then
    resized to ``image_size`` x ``image_size`` with ``tf.image.resize`` (bilinear,
    antialiased), rounded and cast to uint8.

    ImageFolder lists files in a fixed but shuffled order; the result is sorted by
    class folder, then file name, instead.

    Args:
        root: Folder laid out as ``root/<split>/<class>/<name>.jpg``.
        image_size: Side ``S`` of the returned images.
        split: The split folder to read.
        center_crop: Crop the central square before resizing.

    Returns:
        A :class:`FlowerArrays` (``images, labels, class_names``).

    Raises:
        UserInputError: If ``root`` or its split is missing or holds no images, or
            ``image_size`` is not a positive integer.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int | np.integer):
        raise UserInputError(
            f"image_size must be a positive integer, got {image_size!r}"
        )
    if image_size <= 0:
        raise UserInputError(f"image_size must be a positive integer, got {image_size}")
    size = int(image_size)
    path = _check_root(root, split)
    builder = tfds.folder_dataset.ImageFolder(
        os.fspath(path), shape=(None, None, 3), dtype=tf.uint8
    )
    class_names = tuple(builder.info.features["label"].names)
    ds = builder.as_dataset(split=split, shuffle_files=False)
    ds = ds.map(
        lambda ex: (
            _square_resize_uint8(ex["image"], size, center_crop),
            ex["label"],
            ex["image/filename"],
        ),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    ).batch(256)
    images, labels, filenames = [], [], []
    for im, lab, fn in tfds.as_numpy(ds):
        images.append(im)
        labels.append(lab)
        filenames.extend(fn)
    images_np = np.concatenate(images).astype(np.uint8)
    labels_np = np.concatenate(labels).astype(np.int32)
    # Labels follow the sorted class names, so (label, name) sorts by class folder,
    # then file name: the order ImageFolder lists files in before it shuffles them.
    keys = [
        (int(lab), os.path.basename(os.fsdecode(fn)))
        for lab, fn in zip(labels_np, filenames, strict=True)
    ]
    order = np.asarray(sorted(range(len(keys)), key=keys.__getitem__), np.int64)
    return FlowerArrays(images_np[order], labels_np[order], class_names)
