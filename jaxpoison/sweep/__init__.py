"""The sweep engine: trials in chunks; finished chunks are kept and resumed from."""

from jaxpoison.sweep.chunks import run_chunks

__all__ = ["run_chunks"]
