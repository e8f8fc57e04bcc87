"""CIFAR-10 through tensorflow-datasets' own `cifar10` builder, and the shipped sample.

On a connected machine `load_cifar10(download=True)` downloads and prepares the data as
tfds always does. Offline, point `data_dir` (or `TFDS_DATA_DIR`) at a prepared data dir.
Examples are returned in the ORIGINAL CIFAR-10 order (tfds' `id` field `train_01234`
is original index 1234), so indices agree with the papers and benchmark setups.
"""

from __future__ import annotations

import os

import numpy as np

from jaxpoison.data.arrays import ImageData
from jaxpoison.errors import UserInputError

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
SAMPLE_PATH = os.path.join(
    os.path.dirname(__file__), "..", "assets", "cifar10_sample.npz"
)


def resolve_data_dir(data_dir: str | None) -> str:
    """`data_dir`, else `$TFDS_DATA_DIR`, else tfds' default (~/tensorflow_datasets)."""
    if data_dir:
        return os.path.expanduser(data_dir)
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser(
        "~/tensorflow_datasets"
    )


def load_tfds_split(
    name: str, split: str, data_dir: str | None, download: bool
) -> dict[str, np.ndarray]:
    """One tfds split as a dict of numpy arrays (whole split in one batch)."""
    import tensorflow_datasets as tfds

    data_dir = resolve_data_dir(data_dir)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise UserInputError(f"unknown tfds dataset {name!r}") from None
    except Exception as e:  # noqa: BLE001 - a broken dataset_info.json, say
        raise _damaged(name, data_dir, e) from None
    if not builder.is_prepared():
        if not download:
            raise UserInputError(
                f"{name} is not prepared in data dir {data_dir} (set --data_dir or "
                "TFDS_DATA_DIR, or allow download)"
            )
        builder.download_and_prepare()
    if split.split("[")[0] not in builder.info.splits:
        raise UserInputError(
            f"{name} has no split {split!r}; splits: {', '.join(builder.info.splits)}"
        )
    try:
        return tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt record file
        raise _damaged(name, data_dir, e) from None


def _damaged(name: str, data_dir: str, error: Exception) -> UserInputError:
    """One line for a prepared dataset that cannot be read."""
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    return UserInputError(
        f"the {name} dataset in {data_dir} is damaged ({type(error).__name__}: "
        f"{reason}); delete {os.path.join(data_dir, name)} and prepare it again"
    )


def load_cifar10(
    split: str = "train", data_dir: str | None = None, download: bool = False
) -> ImageData:
    """CIFAR-10 `split` ("train" or "test") as arrays in original order."""
    raw = load_tfds_split("cifar10", split, data_dir, download)
    ids = np.array([int(s.decode().split("_")[1]) for s in raw["id"]])
    order = np.argsort(ids)
    return ImageData(
        images=raw["image"][order],
        labels=raw["label"][order].astype(np.int32),
        class_names=CIFAR10_CLASSES,
        ids=ids[order],
    )


def load_cifar10_sample(split: str = "train") -> ImageData:
    """The real CIFAR-10 sample shipped in the package (first 30 per class).

    Train: the first 30 images of each class in the training split; test: likewise
    in the test split; `ids` give their original indices. Decoded from the same JPEG
    copy of CIFAR-10 the CI data dir is made from.
    """
    if split not in ("train", "test"):
        raise UserInputError(
            f"the shipped sample has splits train and test, not {split!r}"
        )
    with np.load(SAMPLE_PATH) as npz:
        return ImageData(
            images=npz[f"{split}_images"],
            labels=npz[f"{split}_labels"].astype(np.int32),
            class_names=CIFAR10_CLASSES,
            ids=npz[f"{split}_ids"],
        )
