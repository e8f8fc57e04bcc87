"""Truong et al. 2020's tables, curves and findings from a backdoor grid's rows.

A grid row is one run (a `Cell` and a seed) with its metrics before and after
clean fine-tuning (`<metric>_before`, `<metric>_after`, as
`victims.metrics.backdoor_metrics` names them), `epochs_run`, `n_poisons` and its
`dataset`. Per dataset, `tables` shapes the mean and std over seeds like the
paper's Tables 2-5 and its alpha / poison-rate curves, `our_trends` sets our
numbers against each finding of the paper's abstract, and `markdown` writes it all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from jaxpoison.report import markdown_table
from jaxpoison.summaries import group_rows

# Truong et al. 2020's findings as their abstract states them (the tables' numbers
# are for ImageNet-pretrained ResNet-50 / NasNet at 224 px and are not reproduced).
PAPER_TRENDS = {
    "success_varies": "the success rate varies widely with architecture, trigger "
    "pattern and regularisation",
    "hard_to_detect": "poisoned models are hard to detect from performance alone "
    "(clean accuracy of poisoned and clean victims is close)",
    "regularisation": "regularisation typically reduces the backdoor success rate, "
    "but can have no effect or even slightly increase it",
    "fine_tuning": "a few epochs of further training on a small clean set render "
    "backdoors ineffective without affecting the model's performance",
}
TREND_LINES = {
    "success_varies": "ASR by trigger: {}",
    "hard_to_detect": "clean val accuracy, poisoned minus clean victim: {} points",
    "regularisation": "ASR change vs no regulariser (points): {}",
    "fine_tuning": "ASR before -> after fine-tuning: {}",
}
METRICS = ("asr", "clean_val_accuracy", "poisoned_val_accuracy")
TABLES = (
    "table2_triggers",
    "table3_strategy",
    "table4_regularizers",
    "table5_finetuning",
    "alpha_curve",
    "rate_curve",
)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One grid cell (a run per seed): trigger, blend opacity alpha (Eq. 7), poison
    rate lambda (Eq. 8), strategy (many-to-one or one-to-one), regulariser."""

    trigger: str
    alpha: float
    rate: float
    strategy: str
    regularizer: str


CELL_FIELDS = tuple(f.name for f in dataclasses.fields(Cell))


def mean_std(values) -> dict:
    v = np.asarray(list(values), np.float64)
    return {"mean": float(v.mean()), "std": float(v.std()), "n": len(v)}


def cell_stats(rows: Sequence[dict]) -> dict:
    """Mean and std over a cell's seeds of each metric, epochs and poisons."""
    out = {}
    for m in (*METRICS, "adversarial_clean_accuracy"):
        for when in ("before", "after"):
            out[f"{m}_{when}"] = mean_std(r[f"{m}_{when}"] for r in rows)
    out["epochs_run"] = mean_std(r["epochs_run"] for r in rows)
    out["n_poisons"] = mean_std(r["n_poisons"] for r in rows)
    return out


def tables(
    rows: Sequence[dict],
    rate: float,
    triggers: Mapping[str, float],
    regularizers: Sequence[str],
    regularizer_triggers: Sequence[str],
) -> dict:
    """Tables shaped like Truong et al.'s Tables 2-5 and the two curves, per dataset.

    `rate` is the default poison rate and `triggers` each trigger's default alpha
    (a trigger's default cell: many-to-one, no regulariser); `regularizers` are
    tabulated at the default cells of `regularizer_triggers`.

    table2_triggers: per trigger at its default cell: ASR, clean and poisoned val
      accuracy (before fine-tuning), next to the clean victim (rate 0) if run.
    table3_strategy: per trigger, many-to-one vs one-to-one.
    table4_regularizers: per regulariser and trigger at the default cell.
    table5_finetuning: per trigger (default cell), every metric before / after.
    alpha_curve / rate_curve: ASR per trigger along alpha / lambda.
    A cell that was not run is None (or left out of its curve).
    """
    out = {}
    rate = float(rate)
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        d = [r for r in rows if r["dataset"] == ds]
        stats = {k: cell_stats(v) for k, v in group_rows(d, CELL_FIELDS).items()}

        def at(trigger, alpha, lam=rate, strategy="many_to_one", reg="none"):
            return stats.get((trigger, float(alpha), float(lam), strategy, reg))  # noqa: B023

        t = {k: {} for k in TABLES}
        for name, alpha in triggers.items():
            base = at(name, alpha)
            if base is None:
                continue
            t["table2_triggers"][name] = {
                "alpha": float(alpha),
                "rate": rate,
                **{m: base[f"{m}_before"] for m in METRICS},
                "clean_victim": at(name, alpha, 0.0),
            }
            t["table3_strategy"][name] = {
                "many_to_one": base,
                "one_to_one": at(name, alpha, strategy="one_to_one"),
            }
            t["table5_finetuning"][name] = base
            alphas = sorted({r["alpha"] for r in d})
            t["alpha_curve"][name] = {a: s for a in alphas if (s := at(name, a))}
            lams = sorted({r["rate"] for r in d})
            t["rate_curve"][name] = {
                lam: s for lam in lams if (s := at(name, alpha, lam))
            }
        for reg in regularizers:
            for name in regularizer_triggers:
                if s := at(name, triggers[name], reg=reg):
                    t["table4_regularizers"].setdefault(reg, {})[name] = s
        out[ds] = t
    return out


def our_trends(tab: dict) -> dict:
    """Our numbers against each of the paper's findings, one line each."""

    def mean(s, key):
        return s[key]["mean"]

    def change(a, b):  # in points
        return f"{100 * (a - b):+.1f}"

    out = {}
    for ds, t in tab.items():
        t2, regs = t["table2_triggers"], t["table4_regularizers"]
        none = regs.get("none", {})
        found = {
            "success_varies": [
                f"{k} {100 * mean(v, 'asr'):.1f}%" for k, v in t2.items()
            ],
            "hard_to_detect": [
                change(
                    mean(v, "clean_val_accuracy"),
                    mean(v["clean_victim"], "clean_val_accuracy_before"),
                )
                for v in t2.values()
                if v["clean_victim"]
            ],
            "regularisation": [
                f"{reg}/{k} "
                + change(mean(s, "asr_before"), mean(none[k], "asr_before"))
                for reg, per in regs.items()
                if reg != "none"
                for k, s in per.items()
                if k in none
            ],
            "fine_tuning": [
                f"{k} {100 * mean(s, 'asr_before'):.1f}% -> "
                f"{100 * mean(s, 'asr_after'):.1f}% (clean acc "
                + change(
                    mean(s, "clean_val_accuracy_after"),
                    mean(s, "clean_val_accuracy_before"),
                )
                + ")"
                for k, s in t["table5_finetuning"].items()
            ],
        }
        out[ds] = {
            k: TREND_LINES[k].format(", ".join(v)) for k, v in found.items() if v
        }
    return out


def markdown(tab: dict, trends: dict) -> str:
    """Every table as markdown, mean +- std over seeds, in percent, then the
    paper's findings next to ours."""

    def pct(s, key):
        if s is None:
            return "-"
        return f"{100 * s[key]['mean']:.1f} +- {100 * s[key]['std']:.1f}"

    def asr_acc(s):
        if s is None:
            return "-"
        return f"{pct(s, 'asr_before')} / {pct(s, 'clean_val_accuracy_before')}"

    def block(title, header, body):
        return [title, "", markdown_table(header, body)]

    lines = []
    for ds, t in tab.items():
        lines.append(f"## {ds}\n")
        lines += block(
            "Table 2 (triggers, before fine-tuning)",
            ["trigger", "alpha", "ASR", "clean val acc", "poisoned val acc"]
            + ["clean victim ASR", "clean victim clean acc"],
            [
                [k, str(v["alpha"]), *(pct(v, m) for m in METRICS)]
                + [pct(v["clean_victim"], f"{m}_before") for m in METRICS[:2]]
                for k, v in t["table2_triggers"].items()
            ],
        )
        lines += block(
            "\nTable 3 (strategy: ASR / clean val acc, before fine-tuning)",
            ["trigger", "many-to-one", "one-to-one"],
            [
                [k, asr_acc(v["many_to_one"]), asr_acc(v["one_to_one"])]
                for k, v in t["table3_strategy"].items()
            ],
        )
        lines += block(
            "\nTable 4 (regularisers: ASR / clean val acc, before fine-tuning)",
            ["regulariser", "trigger", "ASR", "clean val acc"],
            [
                [reg, k, pct(s, "asr_before"), pct(s, "clean_val_accuracy_before")]
                for reg, per in t["table4_regularizers"].items()
                for k, s in per.items()
            ],
        )
        lines += block(
            "\nTable 5 (clean fine-tuning: before -> after)",
            ["trigger", "ASR", "clean val acc", "poisoned val acc"],
            [
                [k]
                + [
                    f"{pct(s, f'{m}_before')} -> {pct(s, f'{m}_after')}"
                    for m in METRICS
                ]
                for k, s in t["table5_finetuning"].items()
            ],
        )
        lines.append("\nTrends: the paper (abstract) / ours\n")
        for key, text in PAPER_TRENDS.items():
            ours = trends.get(ds, {}).get(key, "not run")
            lines.append(f"- {key}: paper: {text}. Ours: {ours}.")
        lines.append("")
    return "\n".join(lines)
