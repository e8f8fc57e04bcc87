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


def _pin_xdist_worker_to_one_core() -> None:
    """Runs each pytest-xdist worker (and the CLI runs it starts) on a core of its own.

    Unpinned, the two workers of the default run (`-n 2`) and the experiments they
    start each ran XLA:CPU thread pools sized for both cores, and tests took about
    2.5x their time alone (tests/test_train.py's default tests: 97 s alone, its
    seven slowest 216 s in the full run; the MetaPoison CLI smoke 91 s alone, 238 s
    in the full run); the default run took 1,164 s unpinned and 897 s pinned, on
    2026-12-02. Runs before JAX starts a backend, so XLA sizes its pools for one core.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
    if (
        not worker.startswith("gw")
        or workers < 2
        or not hasattr(os, "sched_setaffinity")
    ):
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= workers:
        os.sched_setaffinity(0, {cores[int(worker[2:]) % len(cores)]})


_pin_xdist_worker_to_one_core()

# The strict modules: jax_numpy_dtype_promotion=strict (no implicit int/float or
# bool/float mixing) and DeprecationWarning / FutureWarning as errors (pyproject
# ignores those two elsewhere), in the test modules checked to pass under both.
# Not the rest yet: the victims' loss (victims/train.py weighted_loss multiplies
# float weights by a bool mask and divides by an int count) and everything that
# trains through it (regularizers, unroll, early stopping, the experiments) promote
# implicitly; the warnings were not checked there.
STRICT_MODULES = frozenset(
    {
        "test_analysis",
        "test_backdoor",
        "test_data",
        "test_feature_collision",
        "test_flowers",
        "test_interop",
        "test_plots",
        "test_report",
        "test_roadsigns",
        "test_steps",
        "test_trials",
        "test_triggers",
    }
)


def _is_strict(module) -> bool:
    return module is not None and module.__name__.rsplit(".", 1)[-1] in STRICT_MODULES


def pytest_collection_modifyitems(items):
    for item in items:
        if _is_strict(getattr(item, "module", None)):
            item.add_marker(pytest.mark.filterwarnings("error::DeprecationWarning"))
            item.add_marker(pytest.mark.filterwarnings("error::FutureWarning"))


@pytest.fixture(autouse=True)
def strict_dtype_promotion(request):
    if _is_strict(request.module):
        with jax.numpy_dtype_promotion("strict"):
            yield
    else:
        yield


REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(
    os.environ.get("JAXPOISON_SHARED_DATA") or REPO.parent / "shared" / "data"
)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true")


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    """One persistent JAX compilation cache for every experiment run in a subprocess.

    The CLI runs of the tests (smoke, killed, resumed) compile the same programs;
    loading them from the cache instead of compiling roughly halves the later runs.
    A cached executable is the compiled one, so results are unchanged (the kill
    tests compare rows byte for byte across a compiling and a loading run).
    """
    saved = {k: os.environ.get(k) for k in _CACHE_ENV}
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


_CACHE_ENV = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")


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
