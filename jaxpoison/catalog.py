"""The experiments a user can run: one ml-collections config file per experiment.

The configs live in the repository's top-level `configs/` folder, and the same files
ship inside the wheel as the package `jaxpoison.configs` (pyproject maps that package
onto `configs/`, so there is one copy). The list is read from the files themselves, so
a new `configs/<name>.py` appears in `jaxpoison list` and `--help` with the first line
of its docstring, and `--config <name>[:args]` finds it from any folder.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from pathlib import Path
from typing import NamedTuple

from jaxpoison.errors import UserInputError

_SOURCE_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


class Experiment(NamedTuple):
    """A config file: its name (the file's stem), path and one-line description."""

    name: str
    path: Path
    summary: str


def configs_dir() -> Path:
    """The folder holding the config files.

    The package `jaxpoison.configs` when installed (a wheel, or an editable install,
    which maps it onto the checkout's `configs/`); else, running from a checkout on
    `PYTHONPATH`, the checkout's `configs/`.
    """
    try:
        spec = importlib.util.find_spec("jaxpoison.configs")
    except ModuleNotFoundError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return _SOURCE_CONFIGS


def _summary(path: Path) -> str:
    """The first line of the file's docstring, read without running the file."""
    try:
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    except (OSError, SyntaxError, ValueError):
        return "(unreadable config file)"
    return (doc or "").strip().split("\n", 1)[0].strip() or "(no docstring)"


def experiments(folder: Path | None = None) -> list[Experiment]:
    """Every config file in `folder` (default `configs_dir()`), sorted by name."""
    folder = configs_dir() if folder is None else folder
    paths = sorted(folder.glob("*.py")) if folder.is_dir() else []
    return [
        Experiment(p.stem, p, _summary(p)) for p in paths if not p.stem.startswith("_")
    ]


def listing(folder: Path | None = None) -> str:
    """One line per experiment: its name, padded, and its docstring's first line."""
    found = experiments(folder)
    if not found:
        return f"  (no config files in {configs_dir() if folder is None else folder})"
    width = max(len(e.name) for e in found)
    return "\n".join(f"  {e.name:<{width}}  {e.summary}" for e in found)


def resolve_config(spec: str) -> str:
    """`--config` as given -> a config file path, keeping any `:args` suffix.

    A path to an existing file is kept as it is (`configs/quickstart.py:runlocal`).
    A bare name (`quickstart`, `quickstart.py`, `quickstart:runlocal`) that is no
    file here is looked up in `configs_dir()`.

    Raises:
      UserInputError: a bare name that names no experiment.
    """
    path, sep, arg = spec.partition(":")
    if os.path.exists(path) or os.sep in path or (os.altsep or os.sep) in path:
        return spec  # a path: a missing one is reported when the config loads
    name = path.removesuffix(".py")
    candidate = configs_dir() / f"{name}.py"
    if not name or not candidate.is_file():
        known = ", ".join(e.name for e in experiments()) or "none found"
        raise UserInputError(
            f"no config file or experiment named {path!r}; experiments: {known} "
            "(jaxpoison list)"
        )
    return f"{candidate}{sep}{arg}"
