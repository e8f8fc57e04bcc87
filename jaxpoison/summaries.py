"""Summaries of result rows, shared by every experiment's summary.json and `report`.

Rows are grouped by setting fields (`group_rows`); per group, a boolean field
becomes a rate with its 95% Wilson interval (`results.rate_summary`) and float
fields means or medians (`group_summary`). Group labels read `key=value,...`, the
form `report.summary_hints` recognises.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxpoison.results import rate_summary


def mcnemar_p(more: int, fewer: int) -> float:
    """Exact two-sided McNemar p-value of `more` vs `fewer` discordant pairs
    (binomial(more + fewer, 1/2), doubled tail, at most 1)."""
    n, k = more + fewer, min(more, fewer)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n if n else 1.0
    return min(1.0, 2 * tail)


def fisher_exact_p(hits_a: int, n_a: int, hits_b: int, n_b: int) -> float:
    """Two-sided Fisher exact p-value that two unpaired rates, hits_a / n_a and
    hits_b / n_b, are equal: the hypergeometric probability of every table with
    the same margins that is at most as likely as the observed one."""
    hits, total = hits_a + hits_b, n_a + n_b

    def table(k: int) -> float:
        return math.comb(n_a, k) * math.comb(n_b, hits - k) / math.comb(total, hits)

    observed = table(hits_a)
    tables = (table(k) for k in range(max(0, hits - n_b), min(hits, n_a) + 1))
    # Ties within rounding count as at most as likely (R's fisher.test does too).
    return min(1.0, sum(t for t in tables if t <= observed * (1 + 1e-7)))


def sort_key(v: Any) -> tuple:
    """Numbers before strings, each in natural order (mixed types never compare)."""
    return (0, v, "") if isinstance(v, int | float) else (1, 0, str(v))


def group_rows(rows: Sequence[dict], by: Sequence[str]) -> dict[tuple, list[dict]]:
    """Rows grouped by the values of `by`, groups in sorted order."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in by), []).append(r)
    order = sorted(groups, key=lambda g: tuple(sort_key(v) for v in g))
    return {g: groups[g] for g in order}


def group_label(by: Sequence[str], values: Sequence[Any]) -> str:
    """`k1=v1,k2=v2` (`all` when there is no key)."""
    return ",".join(f"{k}={v}" for k, v in zip(by, values, strict=True)) or "all"


def rate_text(entry: dict) -> str:
    """`rate% [low, high] of n` (in percent, the 95% Wilson interval) of a
    `group_summary` or `results.rate_summary` entry, for a run's printout."""
    low, high = 100 * entry["ci95_low"], 100 * entry["ci95_high"]
    return f"{100 * entry['rate']:.1f}% [{low:.1f}, {high:.1f}] of {entry['n']}"


def group_summary(
    rows: Sequence[dict],
    by: Sequence[str],
    rate: str | None = "success",
    means: Sequence[str] = (),
    medians: Sequence[str] = (),
) -> dict[str, dict]:
    """Per group of `by`: the rate of `rate` (Wilson CI), means and medians.

    Returns `{"k=v,...": {"rate", "ci95_low", "ci95_high", "successes", "n",
    "mean_<field>", "median_<field>"}}`; rows without a field are left out of
    its statistic.
    """
    out = {}
    for values, sel in group_rows(rows, by).items():
        entry: dict[str, Any] = {"n": len(sel)}
        if rate is not None:
            entry.update(rate_summary(r[rate] for r in sel if rate in r))
        for k in means:
            got = [r[k] for r in sel if k in r]
            entry[f"mean_{k}"] = float(np.mean(got)) if got else float("nan")
        for k in medians:
            got = [r[k] for r in sel if k in r]
            entry[f"median_{k}"] = float(np.median(got)) if got else float("nan")
        out[group_label(by, values)] = entry
    return out
