"""Figures through matplotlib's object-oriented API, written atomically as PNG.

Library code never touches pyplot or the global backend (`matplotlib.use`
switches a notebook user's backend); a `Figure` renders through its own Agg
canvas. A driver makes a figure only when it has data to show.
"""

from __future__ import annotations

import io

from matplotlib.figure import Figure

from jaxpoison.results import atomic_write_bytes


def new_figure(
    nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (5.0, 3.5)
) -> tuple[Figure, object]:
    """A figure with a grid of axes (`fig.subplots` semantics: one Axes or array)."""
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=True)


def save_figure(fig: Figure, path: str, dpi: int = 120) -> str:
    """Writes `fig` to `path` as PNG (atomically); returns the path."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(path, buffer.getvalue())
    return path
