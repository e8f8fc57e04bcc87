"""Datasets as in-memory arrays, loaded through tensorflow-datasets."""

from jaxpoison.data.arrays import (
    ImageData,
    check_classes,
    class_pair,
    first_k_per_class,
    nested_split,
    split_fractions,
)
from jaxpoison.data.cifar import (
    CIFAR10_CLASSES,
    load_cifar10,
    load_cifar10_sample,
    resolve_data_dir,
)

__all__ = [
    "CIFAR10_CLASSES", "ImageData", "check_classes", "class_pair",
    "first_k_per_class", "load_cifar10", "load_cifar10_sample", "nested_split",
    "resolve_data_dir", "split_fractions",
]
