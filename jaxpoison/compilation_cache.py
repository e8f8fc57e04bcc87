"""JAX's persistent compilation cache for the command line.

Compiling is a large share of an experiment run at the `runlocal` size, and a
rerun (resuming after an interruption, another seed, the same config again)
compiles the same programs again. JAX keeps compiled executables on disk when
`jax_compilation_cache_dir` is set, keyed by the program, the compile options, the
XLA flags and the devices, so a rerun loads them instead (`python
benchmarks/experiment_times.py --variants ours cached`; README, Speed). The CLI
turns it on; the library's API leaves JAX's configuration to the caller.

The cache lives in a folder per kind of host CPU (its model and instruction-set
flags), so a home directory shared by different machines never hands one machine
code compiled for another's instructions. Its size is bounded: the least
recently used entries are evicted past `MAX_BYTES`.
"""

from __future__ import annotations

import hashlib
import os
import platform

import jax

CACHE_ENV = "JAXPOISON_COMPILATION_CACHE"  # a folder, or empty for no cache
MAX_BYTES = 4 << 30
# Programs that compile faster than this are not worth a file: JAX's default is
# 1 s, which leaves out most of an experiment's programs on CPU.
MIN_COMPILE_SECONDS = 0.1


def host_kind() -> str:
    """A short digest of this machine's architecture, CPU model and CPU flags."""
    fields = [platform.machine()]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part"):
                    fields.append(line.strip())
                elif not line.strip() and len(fields) > 1:
                    break  # the first processor describes them all
    except OSError:
        fields.append(platform.processor())
    return hashlib.sha256("\n".join(fields).encode()).hexdigest()[:12]


def default_dir() -> str:
    """`$JAXPOISON_COMPILATION_CACHE`, else `~/.cache/jaxpoison/xla/<host kind>`."""
    if CACHE_ENV in os.environ:
        return os.environ[CACHE_ENV]
    return os.path.join(
        os.path.expanduser("~"), ".cache", "jaxpoison", "xla", host_kind()
    )


def enable(path: str | None, processes: int = 1) -> str | None:
    """Caches compiled programs in `path`; returns the folder used (None: none).

    Only for a single process (`processes` = 1; otherwise no cache): JAX writes
    the cache from process 0 alone, so in a multi-process run process 0 loads its
    programs while the others compile theirs, and they reached the first
    collective more than gloo's 30 s after it ("Gloo context initialization
    failed: DEADLINE_EXCEEDED" in a gradient-matching smoke run, `--processes 2`).

    `path` None means `$JAX_COMPILATION_CACHE_DIR` when set, left to JAX as it
    configures it (the user's own cache, which other programs may share: a cache
    that evicts must not share a folder with one that does not, whose entries lack
    the access stamps eviction reads), else `default_dir()`. An empty `path` turns
    the cache off, that variable too. JAX's variable for the shortest compile
    worth keeping, when set, is kept. Must run before the first compilation.
    """
    if processes > 1:
        path = ""
    if path is None and os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    if path is None:
        path = default_dir()
    if not path:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    path = os.path.expanduser(path)
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update(
            "jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS
        )
    # A bounded cache evicts, and locks its files: runs at once may share it.
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return path
