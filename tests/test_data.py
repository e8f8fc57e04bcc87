"""Data: CIFAR-10 through tfds in original order, the shipped sample, splits."""

from __future__ import annotations

import numpy as np
import pytest

from jaxpoison import UserInputError
from jaxpoison.data import (
    CIFAR10_CLASSES,
    ImageData,
    benchmark,
    check_choice,
    check_distinct,
    class_index,
    class_pair,
    first_k_per_class,
    load_cifar10,
    load_cifar10_sample,
    load_dataset,
    nested_split,
    split_fractions,
)


@pytest.mark.realdata
def test_cifar10_through_tfds_keeps_original_order(cifar_tfds_dir, shared_data):
    train = load_cifar10("train", cifar_tfds_dir)
    with np.load(shared_data / "cifar10" / "cifar10_jpeg.npz") as npz:
        labels = npz["train_labels"]
    assert train.images.shape == (50000, 32, 32, 3) and train.images.dtype == np.uint8
    np.testing.assert_array_equal(train.labels, labels)
    np.testing.assert_array_equal(train.ids, np.arange(50000))


@pytest.mark.realdata
def test_shipped_sample_is_the_first_30_per_class_of_cifar10(cifar_tfds_dir):
    test = load_cifar10("test", cifar_tfds_dir)
    sample = load_cifar10_sample("test")
    idx = first_k_per_class(test.labels, 30)
    np.testing.assert_array_equal(sample.ids, idx)
    np.testing.assert_array_equal(sample.images, test.images[idx])


def test_missing_data_dir_raises_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("JAXPOISON_DOWNLOAD", raising=False)
    with pytest.raises(UserInputError, match="not prepared in data dir") as e:
        load_cifar10("train", str(tmp_path / "nowhere"))
    assert "\n" not in str(e.value)
    # The fixes: --download on a connected machine, a data dir, the shipped sample.
    assert "--download" in str(e.value) and "--data_dir" in str(e.value)
    assert "--config.dataset=cifar10_sample" in str(e.value)


CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"


def _cache_cifar10_archive(data_dir, images, labels) -> None:
    """A stand-in cifar-10-binary.tar.gz in tfds' download cache, as if downloaded.

    tfds finds a cached download by the name it derives from the URL and checksum
    and trusts it (../shared/tools/make_tfds_data_dir.py does the same with all
    60,000 images); every data_batch_k and test_batch holds the given images.
    """
    import io
    import tarfile

    import tensorflow_datasets as tfds
    from etils import epath
    from tensorflow_datasets.core.download import resource

    info = tfds.builder("cifar10", data_dir=str(data_dir)).url_infos[CIFAR10_URL]
    folder = data_dir / "downloads" / "cifar10"
    folder.mkdir(parents=True)
    archive = folder / resource.get_dl_fname(CIFAR10_URL, info.checksum)
    records = np.concatenate(
        [labels[:, None], images.transpose(0, 3, 1, 2).reshape(len(images), -1)], 1
    ).astype(np.uint8)
    files = {f"data_batch_{k}.bin": records for k in range(1, 6)}
    files["test_batch.bin"] = records
    files["batches.meta.txt"] = "\n".join(CIFAR10_CLASSES).encode() + b"\n"
    with tarfile.open(archive, "w:gz") as tar:
        for name, content in files.items():
            data = content if isinstance(content, bytes) else content.tobytes()
            member = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    resource.write_info_file(
        url=CIFAR10_URL,
        path=epath.Path(archive),
        dataset_name="cifar10",
        original_fname="cifar-10-binary.tar.gz",
        url_info=info,
    )


@pytest.mark.slow  # 23 s on the loaded 2-core machine, mostly tfds' preparation
def test_download_prepares_cifar10_through_tfds(tmp_path, monkeypatch):
    """`--download` runs tfds' own download_and_prepare; here offline, on a
    cached stand-in archive of 20 sample images, never the internet."""
    sample = load_cifar10_sample("test")
    rows = np.arange(0, 300, 15)
    _cache_cifar10_archive(tmp_path, sample.images[rows], sample.labels[rows])
    monkeypatch.delenv("JAXPOISON_DOWNLOAD", raising=False)
    with pytest.raises(UserInputError, match="--download"):
        load_cifar10("test", str(tmp_path))  # not allowed: nothing is prepared
    monkeypatch.setenv("JAXPOISON_DOWNLOAD", "1")  # what the CLI's --download sets
    test = load_cifar10("test", str(tmp_path))
    np.testing.assert_array_equal(test.images, sample.images[rows])
    np.testing.assert_array_equal(test.labels, sample.labels[rows])
    np.testing.assert_array_equal(test.ids, np.arange(len(rows)))
    monkeypatch.delenv("JAXPOISON_DOWNLOAD")
    assert load_cifar10("train", str(tmp_path)).labels.shape == (5 * len(rows),)


def test_unknown_dataset_raises():
    with pytest.raises(UserInputError, match="unknown dataset 'cifar11'"):
        load_dataset("cifar11")


def test_sample_has_30_per_class():
    sample = load_cifar10_sample("train")
    assert sample.images.shape == (300, 32, 32, 3)
    np.testing.assert_array_equal(np.bincount(sample.labels), [30] * 10)


def test_first_k_per_class_takes_earliest_in_order():
    labels = np.array([2, 0, 1, 0, 2, 1, 0])
    np.testing.assert_array_equal(first_k_per_class(labels, 2), [0, 1, 2, 3, 4, 5])


def test_first_k_per_class_in_class_order():
    labels = np.array([2, 0, 1, 0, 2, 1, 0])
    got = first_k_per_class(labels, 2, class_order=True)
    np.testing.assert_array_equal(got, [1, 3, 2, 5, 0, 4])


def test_config_checks_are_one_line_errors():
    check_choice("cifar10", ("cifar10", "flowers"), "dataset")
    with pytest.raises(UserInputError, match="unknown dataset 'x'; known: a, b"):
        check_choice("x", ("a", "b"), "dataset")
    assert class_index("stop", ("speedlimit", "stop"), "source_class") == 1
    with pytest.raises(UserInputError, match="source_class 'yield' unknown"):
        class_index("yield", ("speedlimit", "stop"), "source_class")
    check_distinct((3, 5, 0), "classes")
    with pytest.raises(UserInputError, match=r"classes must differ, got \(3, 5, 3\)"):
        check_distinct((3, 5, 3), "classes")


def test_first_k_per_class_rejects_class_out_of_range():
    with pytest.raises(UserInputError, match="class 7 is out of range"):
        first_k_per_class(np.array([0, 1, 2]), 1, classes=[7])


def test_class_pair_relabels_to_binary():
    idx, y = class_pair(np.array([3, 5, 1, 5, 3]), (3, 5))
    np.testing.assert_array_equal(idx, [0, 1, 3, 4])
    np.testing.assert_array_equal(y, [0, 1, 1, 0])


def test_split_fractions_partition_and_are_seeded():
    parts = split_fractions(1000, [0.76, 0.19, 0.05], seed=0)
    assert [len(p) for p in parts] == [760, 190, 50]
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(1000))
    again = split_fractions(1000, [0.76, 0.19, 0.05], seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = split_fractions(1000, [0.76, 0.19, 0.05], seed=1)
    assert not np.array_equal(parts[0], other[0])


def test_nested_split_76_19_5_then_80_20():
    parts = nested_split(4317, [0.76, 0.19, 0.05], [0.8, 0.2], seed=0)
    sizes = [[len(x) for x in part] for part in parts]
    # floor(0.76 n), floor(0.95 n) - floor(0.76 n), rest; then floor(0.8 m), rest.
    assert sizes == [[2624, 656], [656, 165], [172, 44]]
    everything = np.concatenate([x for part in parts for x in part])
    np.testing.assert_array_equal(np.sort(everything), np.arange(4317))


def test_split_fractions_reject_bad_fractions():
    with pytest.raises(UserInputError, match="must be >0 and sum to 1"):
        split_fractions(10, [0.5, 0.6], seed=0)


def test_victim_rows_follow_the_benchmark_poisoned_dataset():
    # Two classes, 6 examples each; per_class 4; bases 2 examples of class 1.
    labels = np.array([0, 1] * 6)
    bases = np.array([5, 11])  # the 3rd and 6th examples of class 1
    rows = benchmark.victim_rows(labels, 1, bases, per_class=4)
    # class 0: first 4 (0, 2, 4, 6); class 1: first 4 - 2 without bases (1, 3)
    # plus the bases.
    np.testing.assert_array_equal(rows, [0, 1, 2, 3, 4, 5, 6, 11])


def test_setups_ship_with_the_package():
    specs = benchmark.load_setups("", 100)
    assert specs["base_indices"].shape == (100, 25)
    assert np.all(specs["base_class"] != specs["target_class"])


def test_too_many_setups_raises():
    with pytest.raises(UserInputError, match="num_setups=101"):
        benchmark.load_setups("", 101)


def test_example_ids_are_the_rows_when_a_split_has_none():
    data = ImageData(np.zeros((3, 1, 1, 1), np.uint8), np.zeros(3), ("a",))
    np.testing.assert_array_equal(data.example_ids, [0, 1, 2])
    taken = data.take(np.array([2, 0]))
    np.testing.assert_array_equal(taken.example_ids, [2, 0])
