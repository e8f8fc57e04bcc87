"""Loading PyTorch state dicts (saved as .npz of numpy arrays) into Flax variables.

Conventions: conv `weight` OIHW -> `kernel` HWIO; linear `weight` [out, in] ->
`kernel` [in, out]; BatchNorm `weight`/`bias` -> `scale`/`bias` and
`running_mean`/`running_var` -> batch_stats `mean`/`var`. A module path
`layer2.0.conv1` becomes `layer2_0/conv1`; top-level layers other than the head live
under `backbone`, the head layer under `head`.
"""

from __future__ import annotations

import os
import zipfile

import jax
import numpy as np
from flax import traverse_util

from jaxpoison.errors import UserInputError

_BN_STATS = {"running_mean": "mean", "running_var": "var"}
_SKIP = ("num_batches_tracked",)


def _flax_path(torch_key: str, head_layers: tuple[str, ...]) -> tuple[str, ...]:
    *module, leaf = torch_key.split(".")
    # "layer2.0.conv1" -> ("layer2_0", "conv1"): join a stage and its block index.
    parts: list[str] = []
    for m in module:
        if m.isdigit() and parts:
            parts[-1] = f"{parts[-1]}_{m}"
        else:
            parts.append(m)
    top = "head" if parts[0] in head_layers else "backbone"
    if leaf in _BN_STATS:
        return ("batch_stats", top, *parts, _BN_STATS[leaf])
    return ("params", top, *parts, leaf)


def _convert(flax_path: tuple[str, ...], array: np.ndarray, is_bn: bool) -> tuple:
    *prefix, leaf = flax_path
    if leaf == "weight" and array.ndim == 4:
        return (*prefix, "kernel"), array.transpose(2, 3, 1, 0)
    if leaf == "weight" and array.ndim == 2:
        return (*prefix, "kernel"), array.T
    if leaf == "weight" and is_bn:
        return (*prefix, "scale"), array
    return flax_path, array


def load_torch_state_dict(
    path: str, template: dict, head_layers: tuple[str, ...] = ("linear", "fc")
) -> dict:
    """Reads an npz state dict into variables shaped like `template`.

    Args:
      path: .npz with PyTorch state-dict names as keys.
      template: variables (or `jax.eval_shape` of them) of the target model.
      head_layers: top-level PyTorch layer names that form the model's head.

    Raises:
      UserInputError: the file is missing, or its names or shapes do not fit the
        architecture (one line naming the first mismatch).
    """
    if not os.path.isfile(path):
        raise UserInputError(f"weights file not found: {path}")
    try:
        with np.load(path) as npz:
            state = {k: npz[k] for k in npz.files if not k.endswith(_SKIP)}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise UserInputError(
            f"weights file {os.path.basename(path)} is corrupt or truncated ({e})"
        ) from None
    expected = traverse_util.flatten_dict(jax.tree.map(lambda x: x, template))
    bn_modules = {p[:-1] for p in expected if p[0] == "batch_stats"}
    loaded = {}
    for key, array in state.items():
        path_ = _flax_path(key, head_layers)
        is_bn = ("batch_stats", *path_[1:-1]) in bn_modules
        flax_key, value = _convert(path_, array, is_bn)
        loaded[flax_key] = value
    base = os.path.basename(path)
    missing = sorted(set(expected) - set(loaded))
    extra = sorted(set(loaded) - set(expected))
    if missing or extra:
        what = f"missing {'/'.join(missing[0])}" if missing else ""
        what += (
            f"{'; ' if what else ''}unexpected {'/'.join(extra[0])}" if extra else ""
        )
        raise UserInputError(
            f"weights file {base} does not fit the architecture: {what} "
            f"({len(missing)} missing, {len(extra)} unexpected)"
        )
    for key, value in loaded.items():
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            raise UserInputError(
                f"weights file {base} holds non-finite values (NaN or inf) in "
                f"{'/'.join(key)}"
            )
        if tuple(value.shape) != tuple(expected[key].shape):
            raise UserInputError(
                f"weights file {base} does not fit the architecture: "
                f"{'/'.join(key)} has shape {value.shape}, "
                f"expected {tuple(expected[key].shape)}"
            )
    return traverse_util.unflatten_dict(
        {k: np.asarray(v, np.float32) for k, v in loaded.items()}
    )
