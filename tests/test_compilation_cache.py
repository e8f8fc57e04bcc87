"""The CLI's persistent compilation cache (`jaxpoison.compilation_cache`)."""

from __future__ import annotations

import re

from jaxpoison import compilation_cache
from jaxpoison.results import read_jsonl
from tests.cli_runs import run_cli

QUICK = ["--config", "configs/quickstart.py:runlocal"]


def _entries(cache) -> dict[str, bytes]:
    """Every cached program's access stamp, by file name."""
    return {p.name: p.read_bytes() for p in cache.iterdir() if p.name.endswith("atime")}


def _rows(workdir) -> list[dict]:
    rows = read_jsonl(str(workdir / "results.jsonl"))
    for row in rows:
        row.pop("seconds", None)
    return rows


def test_a_rerun_loads_every_program_from_the_cache_and_writes_the_same_rows(
    tmp_path,
):
    cache = tmp_path / "cache"
    run_cli([*QUICK, f"--compilation_cache={cache}"], tmp_path / "first")
    stored = _entries(cache)
    assert any(name.startswith("jit_poisoned_victims-") for name in stored)
    run_cli([*QUICK, f"--compilation_cache={cache}"], tmp_path / "second")
    reread = _entries(cache)
    # No program compiled anew (no new entry; conftest has JAX keep every program,
    # however short its compilation) and every one was read (JAX stamps an entry's
    # access time when it loads it).
    assert reread.keys() == stored.keys()
    assert all(reread[name] != stored[name] for name in stored)
    assert _rows(tmp_path / "second") == _rows(tmp_path / "first")


def test_an_empty_compilation_cache_flag_keeps_no_cache(tmp_path, monkeypatch):
    for variable in ("JAX_COMPILATION_CACHE_DIR", compilation_cache.CACHE_ENV):
        monkeypatch.setenv(variable, str(tmp_path / variable))
    run_cli([*QUICK, "--compilation_cache="], tmp_path / "run")
    assert list(tmp_path.iterdir()) == [tmp_path / "run"]


def test_the_default_folder_is_per_kind_of_cpu_unless_the_environment_names_one(
    monkeypatch,
):
    monkeypatch.delenv(compilation_cache.CACHE_ENV, raising=False)
    kind = compilation_cache.host_kind()
    assert re.fullmatch(r"[0-9a-f]{12}", kind)
    assert compilation_cache.default_dir().endswith(f"/.cache/jaxpoison/xla/{kind}")
    monkeypatch.setenv(compilation_cache.CACHE_ENV, "/somewhere")
    assert compilation_cache.default_dir() == "/somewhere"
