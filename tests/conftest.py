"""Shared fixtures: the real data in ../shared/data, and a CIFAR-10 tfds data dir.

Real-data tests are marked `realdata`. Where the data is absent they skip, except in
CI (`CI=true`), where a missing copy is a failure: CI must run them.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(
    os.environ.get("JAXPOISON_SHARED_DATA") or REPO.parent / "shared" / "data"
)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true")


def _need(path: Path, what: str) -> Path:
    if path.exists():
        return path
    if IN_CI:
        pytest.fail(f"CI needs {what} at {path}")
    pytest.skip(f"no {what} at {path}")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return _need(SHARED_DATA, "the shared real data")


@pytest.fixture(scope="session")
def cifar_tfds_dir() -> str:
    """A tfds data dir with `cifar10` prepared (made by .ci/run in CI)."""
    data_dir = os.environ.get("JAXPOISON_TFDS_DIR") or os.path.expanduser(
        "~/.cache/jaxpoison/tfds"
    )
    _need(Path(data_dir) / "cifar10", "a prepared cifar10 tfds data dir")
    return data_dir


def load_config(name: str, arg: str | None = None):
    """`configs/<name>`'s get_config(arg), as the command line would load it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        f"config_{Path(name).stem}", REPO / "configs" / name
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)
