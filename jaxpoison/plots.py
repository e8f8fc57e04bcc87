"""Figures through matplotlib's object-oriented API, written atomically as PNG.

Library code never touches pyplot or the global backend (`matplotlib.use`
switches a notebook user's backend); a `Figure` renders through its own Agg
canvas. A driver makes a figure only when it has data to show.
"""

from __future__ import annotations

import io

import numpy as np
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


def rate_errorbar(ax, x, entries, **kwargs):
    """The rates (%) of `group_summary` entries at `x`, with their 95% Wilson
    intervals as error bars."""
    rate, low, high = (
        np.array([e[k] for e in entries]) for k in ("rate", "ci95_low", "ci95_high")
    )
    # Wilson bounds can sit a rounding error past the rate at 0 or 1.
    err = 100 * np.maximum(np.stack([rate - low, high - rate]), 0.0)
    return ax.errorbar(x, 100 * rate, yerr=err, marker="o", capsize=3, **kwargs)
