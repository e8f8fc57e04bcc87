"""Figure builders: panel grids, rates with Wilson intervals, histograms, points."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from jaxpoison import plots
from jaxpoison.results import rate_summary


def test_panels_fill_rows_and_drop_the_cells_past_n():
    fig, axes = plots.panels(5, ncols=2, size=(2.0, 1.5))
    assert len(axes) == 5 and len(fig.axes) == 5
    assert tuple(fig.get_size_inches()) == (4.0, 4.5)  # 2 columns, 3 rows
    _, one_row = plots.panels(3)
    assert len({ax.get_position().y0 for ax in one_row}) == 1


def test_rates_are_percent_with_their_wilson_intervals():
    rates = [rate_summary([True, False, False, False]), {"rate": 0.22}]
    y, err = plots.percent_with_interval(rates)
    np.testing.assert_allclose(y, [25.0, 22.0])
    low, high = rates[0]["ci95_low"], rates[0]["ci95_high"]
    np.testing.assert_allclose(err[:, 0], [25.0 - 100 * low, 100 * high - 25.0])
    np.testing.assert_array_equal(err[:, 1], [0.0, 0.0])  # a published number
    fig, (line, bars) = plots.panels(2)
    plots.draw_rates(line, [1, 2], rates, "run")
    plots.draw_rates(bars, ["a", "b"], rates, bars=True)
    plots.label(line, "t", "number of poisons", "success (%)")
    assert line.get_xlabel() == "number of poisons" and line.get_legend() is not None
    assert [p.get_height() for p in bars.patches] == pytest.approx([25.0, 22.0])


def test_histograms_share_bins_and_count_every_value():
    fig, (overlaid, stacked, log) = plots.panels(3)
    series = {"a": [0.0, 1.0, 1.0], "b": [2.0, 3.0]}
    plots.draw_histograms(overlaid, series, bins=3)
    counts = [sum(p.get_height() for p in c) for c in overlaid.containers]
    assert counts == [3, 2]
    plots.draw_histograms(stacked, series, bins=4, stacked=True)
    assert len(stacked.containers) == 2
    plots.draw_histograms(log, {"p": [1e-9, 0.5, 1.0]}, bins=5, log=True)
    assert log.get_xscale() == "log"
    assert sum(p.get_height() for p in log.containers[0]) == 3  # 1e-9 kept


def test_points_and_a_written_png(tmp_path):
    fig, ax = plots.panels(1)
    points = {"x": np.zeros((3, 2)), "y": np.ones((2, 2))}
    plots.draw_points(ax[0], points, {"y": {"label": "why"}, "x": {"marker": "^"}})
    labels = ax[0].get_legend_handles_labels()[1]
    assert labels == ["why", "x"]  # the order and labels of `styles`
    path = plots.save_figure(fig, str(tmp_path / "f.png"))
    assert Image.open(path).format == "PNG"
