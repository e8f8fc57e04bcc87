"""CIFAR-10 through tensorflow-datasets' own `cifar10` builder, and the shipped sample.

On a connected machine `load_cifar10(download=True)` (the CLI's `--download`) downloads
and prepares the data as tfds always does. Offline, point `data_dir` (or
`TFDS_DATA_DIR`) at a prepared data dir, or use the shipped sample (`cifar10_sample`).
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


DOWNLOAD_ENV = "JAXPOISON_DOWNLOAD"
"""Set to 1 (the CLI's `--download`): tfds may download and prepare missing data."""
MANUAL_DIR_ENV = "JAXPOISON_MANUAL_DIR"
"""The CLI's `--manual_dir`: where our road-sign builder reads the Kaggle archive."""


def download_allowed(download: bool | None = None) -> bool:
    """`download` if given, else whether `$JAXPOISON_DOWNLOAD` is 1 (`--download`)."""
    if download is not None:
        return bool(download)
    return os.environ.get(DOWNLOAD_ENV, "").lower() in ("1", "true", "yes")


def not_prepared_error(name: str, data_dir: str) -> UserInputError:
    """One line naming the fixes for a dataset that is not in the data dir."""
    fixes = (
        "on a machine with internet add --download (download=True in Python) to "
        "let tensorflow-datasets fetch and prepare it, or point --data_dir / "
        "TFDS_DATA_DIR at a data dir where it is prepared (README: Getting the data)"
    )
    if name == "cifar10":
        fixes += (
            "; offline, the CIFAR-10 sample shipped in the package runs: "
            "--config.dataset=cifar10_sample (or the config's :runlocal variant)"
        )
    return UserInputError(f"{name} is not prepared in data dir {data_dir}: {fixes}")


def resolve_data_dir(data_dir: str | None) -> str:
    """`data_dir`, else `$TFDS_DATA_DIR`, else tfds' default (~/tensorflow_datasets)."""
    if data_dir:
        return os.path.expanduser(data_dir)
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser(
        "~/tensorflow_datasets"
    )


def load_tfds_split(
    name: str, split: str, data_dir: str | None, download: bool | None = None
) -> dict[str, np.ndarray]:
    """One tfds split as a dict of numpy arrays (whole split in one batch).

    Args:
      name: a dataset of the tfds catalog (`cifar10`, `tf_flowers`).
      split: e.g. "train", "test", "train[:10%]".
      data_dir: tfds data dir (`resolve_data_dir`).
      download: whether tfds may download and prepare the dataset when it is not
        prepared yet; None: `download_allowed()` (the CLI's `--download`).
    """
    data_dir = resolve_data_dir(data_dir)
    builder = tfds_builder(name, data_dir, download)
    tfds = _tfds()
    if split.split("[")[0] not in builder.info.splits:
        raise UserInputError(
            f"{name} has no split {split!r}; splits: {', '.join(builder.info.splits)}"
        )
    try:
        return tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt record file
        raise _damaged(name, data_dir, e) from None


def _tfds():
    """tensorflow_datasets, or one line saying which extra installs it."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise UserInputError(
            "reading datasets through tensorflow-datasets needs the data extra: "
            "pip install 'jaxpoison[data]' (the shipped cifar10_sample needs nothing)"
        ) from None
    return tfds


def tfds_builder(name: str, data_dir: str | None, download: bool | None = None):
    """tfds' builder for `name`, prepared (downloading first if allowed)."""
    tfds = _tfds()
    data_dir = resolve_data_dir(data_dir)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise UserInputError(f"unknown tfds dataset {name!r}") from None
    except Exception as e:  # noqa: BLE001 - a broken dataset_info.json, say
        raise _damaged(name, data_dir, e) from None
    if not builder.is_prepared():
        if not download_allowed(download):
            raise not_prepared_error(name, data_dir)
        builder.download_and_prepare()
    return builder


def _damaged(name: str, data_dir: str, error: Exception) -> UserInputError:
    """One line for a prepared dataset that cannot be read."""
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    return UserInputError(
        f"the {name} dataset in {data_dir} is damaged ({type(error).__name__}: "
        f"{reason}); delete {os.path.join(data_dir, name)} and prepare it again"
    )


def load_cifar10(
    split: str = "train", data_dir: str | None = None, download: bool | None = None
) -> ImageData:
    """CIFAR-10 `split` ("train" or "test") as arrays in original order.

    `download`: let tfds download and prepare it into `data_dir` when missing (one
    170 MB download, a few minutes, once per data dir); None: the CLI's `--download`.
    """
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
