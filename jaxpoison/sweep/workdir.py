"""The workdir contract every experiment shares, and the guard around a run.

Every experiment's workdir holds:

- `config.json`: the resolved config as run (fields that cannot change results,
  `IGNORED_FIELDS`, left out);
- `inputs.json`: the identity of what the run reads besides its config: the
  SHA-256 of the weights file it names, and each tensorflow-datasets dataset in the
  data dir (`name/version` with its size in bytes);
- `versions.json`: python, jax, jaxlib, flax, optax, orbax-checkpoint,
  tensorflow-datasets, numpy and jaxpoison versions, and the git commit of the
  source tree when there is one;
- `results.jsonl` (one row per trial), `summary.json`, `sweep.json` (the trial
  fingerprint and chunking) with `chunks/` and `checkpoints/` (see
  `jaxpoison.sweep.chunks`), figures as PNG.

`open_workdir(config, workdir)` checks the folder before any model work (a file in
its place or no write permission is one clear error), takes an exclusive lock for
the run (a second run into the same workdir stops, naming the holder), and refuses
a workdir whose `config.json` or `inputs.json` came from a different config, other
weights or other data: resuming with other settings would mix rows of two
experiments in one results file.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import glob
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from typing import Any

from jaxpoison.errors import UserInputError
from jaxpoison.results import write_json

# Config fields that choose how a run is executed, not what it computes (the device
# count is tested to give the same rows: tests/test_trials.py).
IGNORED_FIELDS = frozenset({"cpu_devices"})
LOCK_FILE = ".lock"
PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "tensorflow-datasets",
    "numpy",
    "jaxpoison",
)


def resolved_config(config: Any) -> dict:
    """The config as a plain dict (ConfigDict or mapping), minus IGNORED_FIELDS."""
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in as_dict.items() if k not in IGNORED_FIELDS}


def _canonical(obj: Any) -> Any:
    """JSON round trip: tuples become lists, as they do in config.json."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def first_difference(old: Any, new: Any, path: str = "") -> str | None:
    """The first field (dotted path) where two resolved configs differ, or None."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in sorted(set(old) | set(new)):
            where = f"{path}.{key}" if path else str(key)
            if key not in old or key not in new:
                return where
            found = first_difference(old[key], new[key], where)
            if found is not None:
                return found
        return None
    return None if old == new else (path or "(the config)")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tfds_datasets(data_dir: str) -> dict[str, int]:
    """`name/version` -> bytes of its files, for every prepared dataset."""
    found = {}
    pattern = os.path.join(glob.escape(data_dir), "*", "*", "dataset_info.json")
    for info in sorted(glob.glob(pattern)):
        folder = os.path.dirname(info)
        size = sum(
            os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder)
        )
        found[os.path.relpath(folder, data_dir)] = size
    return found


def inputs_identity(config: Any) -> dict:
    """What the run reads besides its config: weights digest, tfds datasets."""
    identity: dict[str, Any] = {}
    weights = config.get("weights") if hasattr(config, "get") else None
    if weights == "":  # the weights shipped in the package, if any fit the name
        from jaxpoison.models import shipped_weights

        try:
            weights = shipped_weights(config.get("model") or "resnet20")
        except UserInputError:
            weights = None  # the driver reports the unknown model itself
    if isinstance(weights, str) and os.path.isfile(os.path.expanduser(weights)):
        identity["weights_sha256"] = _sha256(os.path.expanduser(weights))
    data_dir = (config.get("data_dir") if hasattr(config, "get") else "") or (
        os.environ.get("TFDS_DATA_DIR", "")
    )
    if data_dir and os.path.isdir(os.path.expanduser(data_dir)):
        identity["tfds_datasets"] = _tfds_datasets(os.path.expanduser(data_dir))
    return identity


def versions() -> dict[str, str]:
    """Versions of the libraries that decide results, and the source commit."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    commit = _git_commit()
    if commit:
        found["git_commit"] = commit
    return found


def _git_commit() -> str | None:
    """HEAD of the git checkout this package runs from (+ "-dirty"), if any."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(
            ["git", "-C", here, "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def check_writable(workdir: str) -> None:
    """Stops with one line if `workdir` cannot be a run's folder."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserInputError(f"--workdir {workdir} is a file, not a folder")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise UserInputError(f"cannot create --workdir {workdir}: {e.strerror}") from e
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise UserInputError(f"--workdir {workdir} is not writable")


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
    """An exclusive lock on `workdir` for the run (released when the process ends)."""
    path = os.path.join(workdir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise UserInputError(
                f"{workdir} is in use by another run (pid {holder}); wait for it "
                "to finish or use another --workdir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing drops the flock


def check_config(config: Any, workdir: str) -> dict:
    """The resolved config; an error if it is unusable (`invalid_field`) or if
    `workdir` was made by a different one."""
    resolved = resolved_config(config)
    problem = invalid_field(resolved)
    if problem is not None:
        raise UserInputError(problem)
    return check_record(_canonical(resolved), workdir, "config")


# Fields every experiment reads the same way (fnmatch patterns on the dotted path):
# counts of things a run must have at least one of, and counts that cannot be < 0.
AT_LEAST_ONE = (
    "chunk_size",
    "num_targets",
    "num_setups",
    "seeds",
    "victim.epochs",
    "victim.*.epochs",
    "victims.*.epochs",
    "clean_training.epochs",
)
NOT_NEGATIVE = ("seed", "*counts", "num_poisons", "*.epochs", "epochs")


def _count_problem(where: str, value: Any) -> str | None:
    """A count field below its minimum (ints, or ints in a list), else None."""
    at_least_one = any(fnmatch.fnmatchcase(where, p) for p in AT_LEAST_ONE)
    not_negative = any(fnmatch.fnmatchcase(where, p) for p in NOT_NEGATIVE)
    if isinstance(value, list | tuple):  # a list of values (seeds, counts)
        if (at_least_one or not_negative) and not value:
            return f"config field {where} is empty"
        if any(isinstance(v, int) and v < 0 for v in value) and (
            at_least_one or not_negative
        ):
            return f"config field {where} is {value}; it cannot hold negative values"
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        return None
    if at_least_one and value < 1:
        return f"config field {where} is {value}; it must be at least 1"
    if not_negative and value < 0:
        return f"config field {where} is {value}; it cannot be negative"
    return None


def invalid_field(config: Any, path: str = "") -> str | None:
    """What no experiment can run with: a NaN or infinite float, a negative seed,
    no epochs or trials (`AT_LEAST_ONE`), negative counts (`NOT_NEGATIVE`).

    A NaN learning rate or step size would otherwise train or craft to NaN and be
    reported as plausible numbers; zero epochs or targets fail deep in JAX.
    """
    if isinstance(config, Mapping):
        for key, value in config.items():
            where = f"{path}.{key}" if path else str(key)
            problem = _count_problem(where, value)
            if problem is not None:
                return problem
            found = invalid_field(value, where)
            if found is not None:
                return found
    elif isinstance(config, list | tuple):
        for i, value in enumerate(config):
            found = invalid_field(value, f"{path}[{i}]")
            if found is not None:
                return found
    elif isinstance(config, float) and not math.isfinite(config):
        return f"config field {path} is {config}; it must be a finite number"
    return None


def check_record(record: dict, workdir: str, name: str) -> dict:
    """`record`; an error if `workdir/<name>.json` holds a different one."""
    resolved = _canonical(record)
    path = os.path.join(workdir, f"{name}.json")
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError) as e:
            raise UserInputError(
                f"{path} is unreadable ({e}); use a new --workdir"
            ) from None
        where = first_difference(old, resolved)
        if where is not None:
            what = "config" if name == "config" else "weights or data"
            raise UserInputError(
                f"{workdir} was made with a different {what} ({name} field "
                f"{where!r} differs); rerun as before or use a new --workdir"
            )
    return resolved


@contextlib.contextmanager
def open_workdir(config: Any, workdir: str) -> Iterator[str]:
    """Checks, locks and stamps `workdir` (config.json, versions.json) for a run.

    A workdir this call creates is removed again if the run stops on bad input
    (`UserInputError`), so a refused run leaves nothing behind; an existing one,
    or one cut short by anything else (a crash, a kill), is kept for resuming.
    """
    created = not os.path.exists(workdir)
    check_writable(workdir)
    try:
        with workdir_lock(workdir):
            resolved = check_config(config, workdir)
            inputs = check_record(inputs_identity(config), workdir, "inputs")
            write_json(os.path.join(workdir, "config.json"), resolved)
            write_json(os.path.join(workdir, "inputs.json"), inputs)
            write_json(os.path.join(workdir, "versions.json"), versions())
            yield workdir
    except UserInputError:
        if created:
            shutil.rmtree(workdir, ignore_errors=True)
        raise
