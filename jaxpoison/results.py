"""Result files: written atomically, so an interrupted run never leaves half a file."""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist"):  # numpy and jax arrays and scalars
        return x.tolist()
    return x


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes `data` to `path` via a temporary file and an atomic rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        # mkstemp makes 0600 files; results are as readable as the umask says.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Writes `text` to `path` via a temporary file and an atomic rename."""
    atomic_write_bytes(path, text.encode())


def write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=True) + "\n")


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
    atomic_write_text(
        path, "".join(json.dumps(_jsonable(r), sort_keys=True) + "\n" for r in rows)
    )


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_npz(path: str, arrays: Mapping[str, Any]) -> None:
    """Writes named arrays to `path` as a compressed .npz, atomically."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
    atomic_write_bytes(path, buffer.getvalue())


def read_npz(path: str) -> dict[str, np.ndarray]:
    """Every array of an .npz file, by name."""
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def wilson_interval(
    successes: int, n: int, confidence: float = 0.95
) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion (Wilson 1927).

    scipy's `binomtest(successes, n).proportion_ci(method="wilson")`; (0, 1) for
    n = 0, where a rate means nothing.
    """
    if n == 0:
        return (0.0, 1.0)
    from scipy.stats import binomtest

    ci = binomtest(int(successes), int(n)).proportion_ci(confidence, method="wilson")
    return (float(ci.low), float(ci.high))


def rate_summary(flags: Iterable[bool]) -> dict[str, float]:
    """Rate of successes with its 95% Wilson interval and count."""
    flags = np.asarray(list(flags), bool)
    k, n = int(flags.sum()), int(flags.size)
    low, high = wilson_interval(k, n)
    return {
        "rate": k / n if n else float("nan"),
        "ci95_low": low,
        "ci95_high": high,
        "successes": k,
        "n": n,
    }
