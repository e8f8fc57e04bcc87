"""The sweep engine: trials in chunks, each finished chunk kept, resumed after a crash."""

from jaxpoison.sweep.chunks import run_chunks

__all__ = ["run_chunks"]
