"""`python -m jaxpoison.report DIR`: tables with Wilson intervals, partial runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxpoison import UserInputError
from jaxpoison.report import (
    flatten,
    natural_keys,
    render,
    summary_hints,
    write_report,
)
from jaxpoison.sweep import run_chunks

REPO = Path(__file__).resolve().parents[1]


def _trial_rows(chunk):
    """100 trials: n_poisons 0 or 4 in turn; 5 of the 50 n=4 trials succeed."""
    rows = []
    for i in chunk["id"]:
        i = int(i)
        n = 4 * (i % 2)
        rows.append(
            {
                "id": i,
                "n_poisons": n,
                "success": bool(n and i < 10),
                "accuracy": 0.5 + (0.25 if n else 0.0),
                "target_class": [0, 0, 0, 0, 1, 2][i % 6],  # uneven: a label
            }
        )
    return rows


def test_finished_run_groups_by_the_design_and_gives_wilson_intervals(tmp_path):
    run_chunks(_trial_rows, {"id": np.arange(100)}, 20, str(tmp_path))
    text = render(str(tmp_path))
    assert "| . | 100 of 100 | finished |" in text
    assert "Grouped by `n_poisons`." in text
    # 5/50: 95% Wilson interval [4.3, 21.4]% (also the README's quickstart table).
    assert "| 4 | 50 | 5/50 = 10.0% [4.3, 21.4] | 0.75 |" in text
    assert "| 0 | 50 | 0/50 = 0.0% [0.0, 7.1] | 0.5 |" in text


class _Stop(Exception):
    pass


def test_partial_run_reports_the_finished_chunks(tmp_path):
    def stop_after_two(chunk):
        if int(chunk["id"][0]) >= 40:
            raise _Stop
        return _trial_rows(chunk)

    with pytest.raises(_Stop):
        run_chunks(stop_after_two, {"id": np.arange(100)}, 20, str(tmp_path))
    path = write_report(str(tmp_path))
    text = Path(path).read_text()
    assert "| . | 40 of 100 | partial |" in text
    assert "## Results: `chunks` (40 rows)" in text
    assert "| 4 | 20 | 5/20 = 25.0%" in text


def test_natural_keys_are_even_factors_not_labels_or_ids():
    rng = np.random.default_rng(0)
    rows = [
        {
            "opacity": [0.2, 0.3][i % 2],
            "n": [1, 2, 4][(i // 2) % 3],
            "label": int(rng.choice(10, p=[0.5] + [0.5 / 9] * 9)),
            "seed": i,
            "max_perturbation": [8 / 255, 9 / 255][i % 2],  # measured, not set
            "success": bool(i % 3),
        }
        for i in range(60)
    ]
    assert natural_keys(rows) == ["n", "opacity"]  # integer settings first


def test_nested_settings_flatten_to_one_row_each():
    rows = [{"target": 3, "settings": [{"k": 1, "ok": True}, {"k": 2, "ok": False}]}]
    assert flatten(rows) == [
        {"target": 3, "k": 1, "ok": True},
        {"target": 3, "k": 2, "ok": False},
    ]


def test_cli_writes_report_with_summary_and_figures(tmp_path):
    run_chunks(_trial_rows, {"id": np.arange(100)}, 50, str(tmp_path))
    (tmp_path / "summary.json").write_text(json.dumps({"trials": 100}))
    (tmp_path / "fig.png").write_bytes(b"\x89PNG\r\n")
    proc = subprocess.run(
        [sys.executable, "-m", "jaxpoison.report", str(tmp_path), "--by", "id"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "report.md").read_text()
    assert proc.stdout.strip() == str(tmp_path / "report.md")
    assert "![fig.png](fig.png)" in text
    assert '"trials": 100' in text
    assert text.count("| 1/1 = 100.0%") == 5  # --by id: one row per trial


def test_not_a_run_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "jaxpoison.report", str(tmp_path / "missing")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("jaxpoison.report: error: no such run")
    with pytest.raises(UserInputError, match="no results.jsonl"):
        render(str(tmp_path))


def test_a_summary_names_the_grouping_when_the_rows_alone_cannot():
    # 3 targets x 4 counts: the target's class (3 values) looks like a design key
    # too; the quickstart's summary groups `by_n_poisons`.
    rows = [
        {"target_class": t, "n_poisons": n, "success": n > 1}
        for t in (2, 5, 7)
        for n in (0, 1, 4, 16)
    ]
    assert natural_keys(rows) == ["target_class"]
    summary = {"by_n_poisons": {"0": {}}, "settings": {"ten/per_class=25": {}}}
    assert summary_hints(summary) == {"n_poisons", "per_class"}
    assert natural_keys(rows, summary_hints(summary)) == ["n_poisons"]


def _wilson_closed_form(k: int, n: int) -> tuple[float, float]:
    """Wilson (1927) in closed form, float64: the interval as it was hand-written."""
    from scipy.stats import norm

    z = norm.ppf(0.975)
    p = k / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / (1 + z**2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def test_wilson_interval_from_scipy_equals_the_closed_form():
    from jaxpoison.results import wilson_interval

    for n in (1, 2, 7, 50, 300):
        for k in sorted({0, 1, n // 3, n - 1, n}):
            assert wilson_interval(k, n) == pytest.approx(
                _wilson_closed_form(k, n), abs=1e-12
            ), (k, n)
    # README's quickstart row "5/50 [4.3, 21.4]%".
    low, high = wilson_interval(5, 50)
    assert (round(100 * low, 1), round(100 * high, 1)) == (4.3, 21.4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_report_is_reachable_from_the_jaxpoison_command(tmp_path):
    from jaxpoison.main import run_main

    run_chunks(_trial_rows, {"id": np.arange(100)}, 50, str(tmp_path))
    with pytest.raises(SystemExit) as done:
        run_main(["jaxpoison", "report", str(tmp_path), "--by", "id"])
    assert done.value.code == 0
    assert (tmp_path / "report.md").read_text().count("| 1/1 = 100.0%") == 5
    with pytest.raises(SystemExit) as done:
        run_main(["jaxpoison", "report", str(tmp_path), "--nope"])
    assert done.value.code == 2
