"""Figures through matplotlib's object-oriented API, written atomically as PNG.

Library code never touches pyplot or the global backend (`matplotlib.use`
switches a notebook user's backend); a `Figure` renders through its own Agg
canvas. A driver makes a figure only when it has data to show.

Builders, for the figures the experiments draw: `panels` (a grid of axes as a
flat list), `draw_rates` (success rates in percent with their 95% Wilson
intervals against x, as a line or bars), `draw_histograms` (labelled series over
shared bins, overlaid or stacked), `draw_points` (labelled 2-D point sets), and
`label` (title, axis labels, legend).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

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


def panels(
    n: int, ncols: int | None = None, size: tuple[float, float] = (4.5, 3.4)
) -> tuple[Figure, list]:
    """A figure of `n` panels of `size` inches each, `ncols` to a row (default:
    all in one row), and its axes as a flat list in reading order."""
    ncols = min(ncols or n, n)
    nrows = -(-n // ncols)
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        fig.delaxes(ax)
    return fig, list(axes[:n])


def label(ax, title="", xlabel="", ylabel="", legend_size: float = 7) -> None:
    """Title and axis labels (what the axes show); a legend of labelled artists."""
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=legend_size)


def percent_with_interval(rates: Sequence[Mapping]) -> tuple[np.ndarray, np.ndarray]:
    """Rates (`results.rate_summary` dicts) in percent, and their 95% Wilson
    intervals as error-bar lengths (2, n), below and above; a rate without an
    interval (a published number) gets none."""
    y = np.array([100.0 * r["rate"] for r in rates])
    low = np.array([100.0 * r.get("ci95_low", r["rate"]) for r in rates])
    high = np.array([100.0 * r.get("ci95_high", r["rate"]) for r in rates])
    return y, np.stack([y - low, high - y])


def draw_rates(ax, x, rates: Sequence[Mapping], label=None, bars=False, **style):
    """Rates in percent against `x` with their 95% Wilson intervals: a line with
    error bars (`style` goes to `errorbar`), or bars with the intervals (where a
    rate has one) on top."""
    y, err = percent_with_interval(rates)
    if bars:
        ax.bar(x, y, label=label, **style)
        has = np.array(["ci95_low" in r for r in rates])
        at = np.asarray(x)[has]
        ax.errorbar(at, y[has], yerr=err[:, has], fmt="none", color="k", capsize=4)
    else:
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label, **style)


def draw_histograms(
    ax,
    series: Mapping[str, Sequence[float]],
    bins: int = 30,
    stacked: bool = False,
    log: bool = False,
    colors: Sequence | None = None,
) -> None:
    """Histograms of labelled series over one set of `bins` bins spanning all their
    values: overlaid and translucent, or `stacked`; with `log`, log-spaced bins
    from the decade below the smallest value (at least 1e-6; smaller ones go to
    the first bin) to the decade above the largest, on a log x axis."""
    values = [np.asarray(v, np.float64) for v in series.values()]
    every = np.concatenate(values)
    if log:
        first = np.floor(np.log10(max(float(every.min()), 1e-6)))
        last = max(np.ceil(np.log10(max(float(every.max()), 1e-6))), first + 1)
        edges = np.logspace(first, last, bins + 1)
        values = [np.maximum(v, edges[0]) for v in values]
        ax.set_xscale("log")
    else:
        edges = np.histogram_bin_edges(every, bins)
    if stacked:
        ax.hist(values, bins=edges, stacked=True, label=list(series), color=colors)
        return
    for i, (name, v) in enumerate(zip(series, values, strict=True)):
        color = colors[i] if colors else None
        ax.hist(v, bins=edges, alpha=0.6, label=name, color=color)


def draw_points(
    ax, series: Mapping[str, np.ndarray], styles: Mapping[str, Mapping] | None = None
) -> None:
    """Named (N, 2) point sets as scatter plots, those in `styles` first and in
    its order; `styles[name]` goes to `scatter` (the legend label is the name
    unless it sets `label`)."""
    styles = styles or {}
    for name in [*styles, *(n for n in series if n not in styles)]:
        style = {"label": name, **styles.get(name, {})}
        ax.scatter(*np.asarray(series[name]).T, **style)


def rate_errorbar(ax, x, entries, **kwargs):
    """The rates (%) of `group_summary` entries at `x`, with their 95% Wilson
    intervals as error bars."""
    rate, low, high = (
        np.array([e[k] for e in entries]) for k in ("rate", "ci95_low", "ci95_high")
    )
    # Wilson bounds can sit a rounding error past the rate at 0 or 1.
    err = 100 * np.maximum(np.stack([rate - low, high - rate]), 0.0)
    return ax.errorbar(x, 100 * rate, yerr=err, marker="o", capsize=3, **kwargs)
