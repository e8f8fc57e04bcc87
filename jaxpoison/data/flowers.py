"""Flowers as numpy arrays: Kaggle's set via tfds' ImageFolder, or tfds' `tf_flowers`.

Truong et al. 2020 use Kaggle "Flowers Recognition" (alxmamaev; 4,317 images, 5
classes), which tfds' catalog does not serve: :func:`load_flowers` reads it from an
ImageFolder layout ``root/<split>/<class>/<name>.jpg`` (the Kaggle zip's ``flowers/``
folder moved to ``root/train/``; one split, ``train``) with
``tfds.folder_dataset.ImageFolder``, in a deterministic order: by class, then by file
name. :func:`load_tf_flowers` reads the catalog's ``tf_flowers`` (TensorFlow's
flower_photos: 3,670 images of the same 5 classes, downloaded by tfds), for users
without the Kaggle set. Both centre-crop to a square and resize.
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


def _check_size(image_size: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int | np.integer):
        raise UserInputError(
            f"image_size must be a positive integer, got {image_size!r}"
        )
    if image_size <= 0:
        raise UserInputError(f"image_size must be a positive integer, got {image_size}")
    return int(image_size)


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
    size = _check_size(image_size)
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


def load_tf_flowers(
    data_dir: str | None = None,
    image_size: int = 64,
    *,
    download: bool | None = None,
    center_crop: bool = True,
) -> FlowerArrays:
    """tfds' catalog ``tf_flowers`` (one split, ``train``, 3,670 images) as arrays.

    Not the Kaggle set of Truong et al. (see the module docstring); the same five
    classes (daisy, dandelion, roses, sunflowers, tulips), resized as
    :func:`load_flowers` does, in tfds' own (fixed) order.

    Args:
        data_dir: tfds data dir (default ``$TFDS_DATA_DIR``).
        image_size: Side ``S`` of the returned images.
        download: let tfds download (218 MB) and prepare it if missing; None: the
            CLI's ``--download``.
        center_crop: Crop the central square before resizing.
    """
    from jaxpoison.data.cifar import tfds_builder

    size = _check_size(image_size)
    builder = tfds_builder("tf_flowers", data_dir, download)
    class_names = tuple(builder.info.features["label"].names)
    ds = builder.as_dataset(split="train", shuffle_files=False).map(
        lambda ex: (_square_resize_uint8(ex["image"], size, center_crop), ex["label"]),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    images, labels = [], []
    for im, lab in tfds.as_numpy(ds.batch(256)):
        images.append(im)
        labels.append(lab)
    if not images:
        return FlowerArrays(
            np.zeros((0, size, size, 3), np.uint8), np.zeros(0, np.int32), class_names
        )
    return FlowerArrays(
        np.concatenate(images).astype(np.uint8),
        np.concatenate(labels).astype(np.int32),
        class_names,
    )
