"""Datasets as in-memory arrays, loaded through tensorflow-datasets."""

from jaxpoison.data.arrays import (
    ImageData,
    check_choice,
    check_classes,
    check_distinct,
    class_index,
    class_pair,
    first_k_per_class,
    nested_split,
    split_fractions,
)
from jaxpoison.data.cifar import (
    CIFAR10_CLASSES,
    DOWNLOAD_ENV,
    MANUAL_DIR_ENV,
    download_allowed,
    load_cifar10,
    load_cifar10_sample,
    resolve_data_dir,
)
from jaxpoison.errors import UserInputError
from jaxpoison.paths import shared_data_dir

__all__ = [
    "CIFAR10_CLASSES",
    "DATASETS",
    "DOWNLOAD_ENV",
    "MANUAL_DIR_ENV",
    "ImageData",
    "check_choice",
    "check_classes",
    "check_distinct",
    "class_index",
    "class_pair",
    "download_allowed",
    "first_k_per_class",
    "load_cifar10",
    "load_cifar10_sample",
    "load_dataset",
    "nested_split",
    "resolve_data_dir",
    "split_fractions",
]

DATASETS = ("cifar10", "cifar10_sample", "road_signs", "flowers", "tf_flowers")
FLOWERS_DIR_ENV = "JAXPOISON_FLOWERS_DIR"


def load_dataset(
    name: str,
    split: str = "train",
    data_dir: str | None = None,
    manual_dir: str | None = None,
    image_size: int = 64,
    download: bool | None = None,
) -> ImageData:
    """Loads a dataset by name as `ImageData` (modules with TensorFlow load lazily).

    Args:
      name: one of `DATASETS` (README, "Getting the data", says where each comes
        from); `cifar10_sample` ships in the package and needs nothing else.
      split: "train"/"test" for CIFAR-10; the others have one split, "train".
      data_dir: tfds data dir (default `$TFDS_DATA_DIR`); for "flowers", the
        ImageFolder root (`<root>/train/<class>/*.jpg`; default
        `$JAXPOISON_FLOWERS_DIR`, else ../shared/data/flowers beside the checkout).
      manual_dir: road signs: the Kaggle layout (images/, annotations/); default
        `$JAXPOISON_MANUAL_DIR` (the CLI's `--manual_dir`).
      image_size: road signs and flowers are resized to this square size.
      download: cifar10, tf_flowers: let tfds download and prepare a missing
        dataset; None: `$JAXPOISON_DOWNLOAD` (the CLI's `--download`).
    """
    if name == "cifar10":
        return load_cifar10(split, data_dir, download)
    if name == "cifar10_sample":
        return load_cifar10_sample(split)
    if name == "road_signs":
        from jaxpoison.data.roadsigns import load_roadsigns

        rs = load_roadsigns(data_dir, manual_dir, image_size)
        return ImageData(rs.images, rs.labels, tuple(rs.class_names), rs.boxes)
    if name == "flowers":
        from jaxpoison.data.flowers import load_flowers

        # Empty: $JAXPOISON_FLOWERS_DIR, else the shared copy beside the checkout.
        root = data_dir or shared_data_dir("flowers", FLOWERS_DIR_ENV)
        fl = load_flowers(root, image_size, split=split)
        return ImageData(fl.images, fl.labels, tuple(fl.class_names))
    if name == "tf_flowers":
        from jaxpoison.data.flowers import load_tf_flowers

        if split != "train":
            raise UserInputError(f"tf_flowers has one split, train, not {split!r}")
        fl = load_tf_flowers(data_dir, image_size, download=download)
        return ImageData(fl.images, fl.labels, tuple(fl.class_names))
    raise UserInputError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
