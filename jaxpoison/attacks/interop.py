"""Poisons in and out: our npz, and the poisoning benchmark's own pickle format.

The benchmark (Schwarzschild et al. 2021, aks2203/poisoning-benchmark) exchanges a
setup's poisons as a folder with `poisons.pickle` (a list of (PIL.Image, label)
tuples), `base_indices.pickle` (indices into the CIFAR-10 training set that the
poisons replace) and `target.pickle` ((PIL.Image, label)). Writing and reading that
format lets poisons move between this library and the PyTorch peers.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
from PIL import Image

from jaxpoison.errors import UserInputError
from jaxpoison.results import atomic_write_bytes, read_npz, write_npz


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] as 8-bit, truncating like torchvision's ToPILImage."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    return np.floor(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


def save_poisons_npz(path: str, **arrays: np.ndarray) -> None:
    """Writes poisons (uint8) and their indices, atomically.

    Expected keys: poisons (S, B, H, W, C), base_indices (S, B), target_indices (S,),
    base_class (S,), target_class (S,); any others are kept too.
    """
    if "poisons" not in arrays:
        raise UserInputError("save_poisons_npz needs poisons=...")
    write_npz(path, {**arrays, "poisons": to_uint8(arrays["poisons"])})


def load_poisons_npz(path: str) -> dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise UserInputError(f"poisons file not found: {path}")
    return read_npz(path)


def merge_poisons_npz(directory: str) -> dict[str, np.ndarray]:
    """Every `*.npz` of `directory` (a sweep's poisons, saved chunk by chunk) as one
    dict of arrays, concatenated along the first axis in file-name order."""
    names = sorted(f for f in os.listdir(directory) if f.endswith(".npz"))
    if not names:
        raise UserInputError(f"no poisons (*.npz) in {directory}")
    parts = [load_poisons_npz(os.path.join(directory, f)) for f in names]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def save_benchmark_setups(directory: str, poisons: dict, test_images) -> None:
    """Each setup of `poisons` (the arrays of `save_poisons_npz`, with `setup`
    ids) in the benchmark's format, as `directory/setup_NNN/`; target images are
    read from `test_images` (uint8) at `target_indices`."""
    for i, setup in enumerate(poisons["setup"]):
        save_benchmark_format(
            os.path.join(directory, f"setup_{int(setup):03d}"),
            poisons["poisons"][i],
            int(poisons["base_class"][i]),
            poisons["base_indices"][i],
            test_images[poisons["target_indices"][i]],
            int(poisons["target_class"][i]),
        )


def save_benchmark_format(
    directory: str,
    poisons: np.ndarray,
    poison_label: int,
    base_indices: np.ndarray,
    target_image: np.ndarray,
    target_label: int,
) -> None:
    """One setup in the benchmark's format (poisons.pickle, base_indices.pickle,
    target.pickle), as its craft_poisons_*.py scripts write it."""
    if len(poisons) != len(base_indices):
        raise UserInputError(
            f"{len(poisons)} poisons but {len(base_indices)} base indices"
        )
    tuples = [(Image.fromarray(p), int(poison_label)) for p in to_uint8(poisons)]
    target = (Image.fromarray(to_uint8(target_image)), int(target_label))
    files = {
        "poisons.pickle": tuples,
        "base_indices.pickle": [int(i) for i in base_indices],
        "target.pickle": target,
    }
    for name, obj in files.items():
        atomic_write_bytes(
            os.path.join(directory, name),
            pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL),
        )


def load_benchmark_format(directory: str) -> dict:
    """Reads a setup written by the benchmark's scripts (or `save_benchmark_format`).

    Returns poisons uint8 (B, H, W, C), poison_labels (B,), base_indices (B,),
    target_image uint8 (H, W, C) and target_label. A triggered backdoor's
    target.pickle also holds its patch (C, s, s) in [0, 1] and the patch's
    top-left corner [x, y]; the patch is pasted onto the target image there, as
    the benchmark's poison_test.py does (`patched` is then True). Only read
    folders you trust: the format is pickle.
    """
    paths = {
        name: os.path.join(directory, f"{name}.pickle")
        for name in ("poisons", "base_indices", "target")
    }
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        raise UserInputError(f"not a poisoning-benchmark folder: missing {missing[0]}")
    loaded = {}
    for name, path in paths.items():
        with open(path, "rb") as f:
            loaded[name] = pickle.load(f)  # noqa: S301 - the benchmark's own format
    images = [np.asarray(img.convert("RGB")) for img, _ in loaded["poisons"]]
    target = loaded["target"]
    if len(target) not in (2, 4):
        raise UserInputError(
            f"{paths['target']}: expected (image, label) or (image, label, patch, "
            f"[x, y]), got a tuple of {len(target)}"
        )
    target_image = np.asarray(target[0].convert("RGB"), np.uint8)
    if len(target) == 4:
        target_image = paste_patch(target_image, target[2], target[3])
    return {
        "poisons": np.stack(images).astype(np.uint8),
        "poison_labels": np.array([lbl for _, lbl in loaded["poisons"]], np.int32),
        "base_indices": np.asarray(loaded["base_indices"], np.int64),
        "target_image": target_image,
        "target_label": int(target[1]),
        "patched": len(target) == 4,
    }


def paste_patch(image: np.ndarray, patch, corner) -> np.ndarray:
    """uint8 `image` (H, W, C) with `patch` ((C, s, s) in [0, 1], a tensor or an
    array) at top-left `corner` = [x, y], rounded to 8 bits as the benchmark's
    ToTensor / ToPILImage round trip (x * 255, truncated)."""
    patch = np.asarray(patch, np.float32)
    startx, starty = (int(v) for v in corner)
    c, s, s2 = patch.shape
    h, w = image.shape[:2]
    if c != image.shape[2] or s != s2 or starty + s > h or startx + s > w:
        raise UserInputError(
            f"patch of shape {patch.shape} at [x, y] = {[startx, starty]} does not "
            f"fit a {h} x {w} target"
        )
    out = image.astype(np.float32) / 255.0
    out[starty : starty + s, startx : startx + s] = np.transpose(patch, (1, 2, 0))
    return to_uint8(out)
