"""Truong et al. 2020's tables, figures' data and main effects from a grid's rows.

A grid has two kinds of rows (`experiments/backdoor_grid.py`):

* a poisoned run (`kind` "poisoned"): a `Cell` (trigger, alpha, rate, strategy,
  regulariser, poison class) and a seed, with its metrics before and after clean
  fine-tuning (`<metric>_before`, `<metric>_after`), the ASR's image counts
  (`asr_hits_*`, `asr_n`) and the poisons per source class (`source_counts`);
* a clean victim (`kind` "clean"), one per seed (and dataset and architecture):
  trained on the unpoisoned poison-set, fine-tuned the same way, with the
  confusion counts (true x predicted) of every trigger's triggered adversarial
  test (`confusion_before/after[trigger]`), from which its ASR towards any poison
  class and source is read (`clean_asr`): the rate a backdoor must beat.

Per dataset and architecture, `tables` shapes them as the paper's outputs (Table 1
counts, Table 2 per trigger retrained no / yes, one-to-one vs many-to-one, the
alpha and poison-rate curves at the curve class, the regularisers per poison
class); `effects` tests the main findings with paired 95% intervals; `markdown`
writes it all with the paper's printed values beside ours where we have them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import scipy.stats

from jaxpoison.report import markdown_table

# The only value of Truong et al. we have in print here: issue 15 quotes it
# ("SNNL: 82% -> 51% average ASR"), read as the average ASR over their runs without
# a regulariser and with the soft-nearest-neighbour loss. The paper's tables
# (Table 1 counts, Table 2's ASR and accuracies, the curves and regulariser
# figures) were not readable offline: every other "paper" cell says so.
PAPER_AVERAGE_ASR = {"none": 0.82, "snn": 0.51}
PAPER_SOURCE = "Truong et al. 2020 as quoted in issue 15"
NOT_AVAILABLE = "not available here"
PAPER_FINDINGS = {
    "backdoor_learnt": "backdoors are learnt: ASR far above a clean model's",
    "regularisation": "regularisation typically lowers the ASR (SNNL: 82% -> 51% "
    "average), though some regularisers leave it or slightly raise it",
    "fine_tuning": "a few epochs of training on a small clean set render backdoors "
    "ineffective without hurting accuracy",
}
NO_VERDICT = "no verdict (the paper states no threshold)"
WHEN = ("before", "after")  # retrained (clean fine-tuning): no, yes


@dataclasses.dataclass(frozen=True)
class Cell:
    """One poisoned grid cell (a run per seed): trigger, blend opacity alpha
    (Eq. 7), poison rate lambda (Eq. 8), strategy (many-to-one or one-to-one),
    regulariser, poison class t."""

    trigger: str
    alpha: float
    rate: float
    strategy: str
    regularizer: str
    poison_class: int


CELL_FIELDS = tuple(f.name for f in dataclasses.fields(Cell))


def mean_ci(values, bounds: tuple[float, float] | None = None) -> dict:
    """Mean of `values` with its 95% Student-t interval (over runs: victims, not
    images, are the independent units), clipped to `bounds` (a rate's [0, 1]);
    a single value has no interval."""
    v = np.asarray(list(values), np.float64)
    n = len(v)
    if n == 0:
        return {"mean": float("nan"), "ci95_low": None, "ci95_high": None, "n": 0}
    mean = float(v.mean())
    if n < 2:
        return {"mean": mean, "ci95_low": None, "ci95_high": None, "n": 1}
    half = float(scipy.stats.t.ppf(0.975, n - 1) * v.std(ddof=1) / np.sqrt(n))
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return {"mean": mean, "ci95_low": low, "ci95_high": high, "n": n}


def rate_ci(values) -> dict:
    """`mean_ci` of rates or accuracies, the interval kept inside [0, 1]."""
    return mean_ci(values, (0.0, 1.0))


def asr_counts(confusion, t: int, source: int | None = None) -> tuple[int, int]:
    """(hits, n) from (C, C) confusion counts (true class x prediction) of a
    triggered test: the images of the source classes (every class but t, or
    `source` alone) classified as t, and how many there are. ASR = hits / n."""
    conf = np.asarray(confusion, np.int64)
    true = np.arange(conf.shape[0])
    eligible = true != t if source is None else true == source
    return int(conf[eligible, t].sum()), int(conf[eligible].sum())


def _rate(hits_n) -> float:
    hits, n = hits_n
    return hits / n if n else 0.0


def one_to_one_source(t: int, num_classes: int, offset: int) -> int:
    """The source class of a one-to-one attack on t: t + offset modulo classes."""
    return (t + offset) % num_classes


def attach_baselines(rows: Sequence[dict], offset: int) -> list[dict]:
    """Poisoned rows, each with its clean victim's ASR (same dataset, model and
    seed, same trigger, poison class and sources) as `clean_asr_before/after`."""
    clean = {(r["dataset"], r["model"], r["seed"]): r for r in rows if _clean(r)}
    out = []
    for r in rows:
        if _clean(r):
            continue
        base = clean.get((r["dataset"], r["model"], r["seed"]))
        r = dict(r)
        if base is not None:
            t = r["poison_class"]
            src = None
            if r["strategy"] == "one_to_one":
                src = one_to_one_source(t, r["num_classes"], offset)
            for when in WHEN:
                conf = base[f"confusion_{when}"][r["trigger"]]
                r[f"clean_asr_{when}"] = _rate(asr_counts(conf, t, src))
                r[f"clean_accuracy_{when}"] = base[f"clean_val_accuracy_{when}"]
        out.append(r)
    return out


def _clean(row: dict) -> bool:
    return row.get("kind") == "clean"


def _select(rows, **fields):
    return [r for r in rows if all(r[k] == v for k, v in fields.items())]


def _stats(rows, when: str) -> dict:
    """ASR, clean accuracy and the clean victim's ASR over runs, one `when`."""
    out = {
        "asr": rate_ci(r[f"asr_{when}"] for r in rows),
        "accuracy": rate_ci(r[f"clean_val_accuracy_{when}"] for r in rows),
    }
    base = [r for r in rows if f"clean_asr_{when}" in r]
    out["clean_victim_asr"] = rate_ci(r[f"clean_asr_{when}"] for r in base)
    # One clean victim per seed: its accuracy counts once, not once per run.
    seeds = {r["seed"]: r[f"clean_accuracy_{when}"] for r in base}
    out["clean_victim_accuracy"] = rate_ci(seeds.values())
    return out


def _both(rows) -> dict:
    return {when: _stats(rows, when) for when in WHEN}


def tables(rows: Sequence[dict], config) -> dict:
    """The paper's outputs per dataset and architecture ("<dataset>/<model>").

    `config` names the defaults: `rate`, `triggers` (each one's alpha),
    `regularizer_triggers`, `curve_class` (per dataset), `one_to_one_offset`.

    table1_counts: per poison class at the first trigger's default cell: N_t,
      poisons n, effective rate, poisons per source class (means over seeds).
    table2_triggers: per trigger at its default cell (many-to-one, no regulariser,
      every poison class x seed): ASR and clean accuracy, retrained no / yes, next
      to the clean victims' ASR on the same triggered images.
    strategy: per trigger, many-to-one vs one-to-one (every poison class).
    alpha_curve / rate_curve: per trigger at the curve class, ASR along alpha /
      lambda (lambda 0 = the clean victim).
    regularizers: per regulariser and trigger, per poison class (means over
      seeds) and the average over runs, with the paper's average where printed.
    """
    rows = attach_baselines(rows, int(config.one_to_one_offset))
    out = {}
    for ds, model in dict.fromkeys((r["dataset"], r["model"]) for r in rows):
        d = _select(rows, dataset=ds, model=model)
        rate = float(config.rate)
        curve_t = int(config.curve_class[ds])
        t = {
            "table1_counts": {},
            "table2_triggers": {},
            "strategy": {},
            "alpha_curve": {},
            "rate_curve": {},
            "regularizers": {},
        }
        for name, alpha in config.triggers.items():
            default = dict(trigger=name, alpha=float(alpha), regularizer="none")
            m2o = _select(d, **default, rate=rate, strategy="many_to_one")
            o2o = _select(d, **default, rate=rate, strategy="one_to_one")
            if m2o:
                t["table2_triggers"][name] = {
                    "alpha": float(alpha),
                    "rate": rate,
                    **_both(m2o),
                    "paper": NOT_AVAILABLE,
                }
                t["strategy"][name] = {"many_to_one": _both(m2o)}
                if o2o:
                    t["strategy"][name]["one_to_one"] = _both(o2o)
            curve = _select(d, trigger=name, poison_class=curve_t, regularizer="none")
            curve = [r for r in curve if r["strategy"] == "many_to_one"]
            alphas = sorted({r["alpha"] for r in curve if r["rate"] == rate})
            t["alpha_curve"][name] = {
                a: _both(_select(curve, alpha=a, rate=rate)) for a in alphas
            }
            at_alpha = [r for r in curve if r["alpha"] == float(alpha)]
            rates = sorted({r["rate"] for r in at_alpha})
            rc = {lam: _both(_select(at_alpha, rate=lam)) for lam in rates}
            if rc and any("clean_asr_before" in r for r in at_alpha):
                # lambda = 0 is the clean victim on the same triggered images.
                rc[0.0] = {
                    when: {"asr": rate_ci(r[f"clean_asr_{when}"] for r in at_alpha)}
                    for when in WHEN
                }
            t["rate_curve"][name] = dict(sorted(rc.items())) if len(rc) > 1 else {}
            if not t["alpha_curve"][name] or len(alphas) < 2:
                t["alpha_curve"][name] = {}
        first = next(iter(config.triggers))
        for r in _select(
            d,
            trigger=first,
            alpha=float(config.triggers[first]),
            rate=rate,
            strategy="many_to_one",
            regularizer="none",
        ):
            c = t["table1_counts"].setdefault(r["poison_class"], [])
            c.append(r)
        t["table1_counts"] = {
            k: {
                "class_size": float(np.mean([r["poison_class_train_size"] for r in v])),
                "n_poisons": float(np.mean([r["n_poisons"] for r in v])),
                "effective_rate": float(np.mean([r["effective_rate"] for r in v])),
                "source_counts": np.mean([r["source_counts"] for r in v], 0).tolist(),
                "paper": NOT_AVAILABLE,
            }
            for k, v in sorted(t["table1_counts"].items())
        }
        for name in config.regularizer_triggers:
            alpha = float(config.triggers[name])
            for reg in dict.fromkeys(r["regularizer"] for r in d):
                runs = _select(
                    d,
                    trigger=name,
                    alpha=alpha,
                    rate=rate,
                    strategy="many_to_one",
                    regularizer=reg,
                )
                if not runs:
                    continue
                classes = sorted({r["poison_class"] for r in runs})
                t["regularizers"].setdefault(reg, {})[name] = {
                    "per_class": {
                        c: _both(_select(runs, poison_class=c)) for c in classes
                    },
                    "average": _both(runs),
                    "paper_average_asr": PAPER_AVERAGE_ASR.get(reg, NOT_AVAILABLE),
                }
        out[f"{ds}/{model}"] = t
    return out


def _paired(a: dict, b: dict, key_a: str, key_b: str) -> dict:
    """Mean of a[k][key_a] - b[k][key_b] over the keys both have (paired runs)."""
    common = [k for k in a if k in b]
    return mean_ci(a[k][key_a] - b[k][key_b] for k in common)


def _by_run(rows, **fields) -> dict:
    return {(r["poison_class"], r["seed"]): r for r in _select(rows, **fields)}


def _verdict_above(diff: dict) -> str:
    if diff["n"] < 2:
        return "not measurable (fewer than 2 paired runs)"
    return "reproduced" if diff["ci95_low"] > 0 else "not reproduced"


def _verdict_below(diff: dict, learnt: str) -> str:
    if diff["n"] < 2:
        return "not measurable (fewer than 2 paired runs)"
    if learnt != "reproduced":
        return "not measurable (no backdoor learnt to lower)"
    return "reproduced" if diff["ci95_high"] < 0 else "not reproduced"


def effects(rows: Sequence[dict], config) -> dict:
    """The main findings, per dataset/architecture and trigger, as paired 95%
    intervals over runs (poison class x seed):

    backdoor_learnt: ASR of the poisoned victim minus the clean victim's on the
      same triggered images (reproduced when the interval is above 0);
    lowered_by_<reg>: ASR with the regulariser minus without, same class and
      seed (reproduced when below 0 and the backdoor was learnt);
    lowered_by_fine_tuning: ASR after clean fine-tuning minus before, same run.

    Beside them, without a verdict (the paper states no threshold): the
    poisoned victim's clean accuracy minus its clean victim's (the paper's "hard
    to detect through performance inspection"), fine-tuning's change in clean
    accuracy ("without affecting the model's performance") and the ASR left
    after fine-tuning minus the clean victim's after the same fine-tuning
    ("rendered ineffective").
    """
    rows = attach_baselines(rows, int(config.one_to_one_offset))
    rate = float(config.rate)
    out = {}
    for ds, model in dict.fromkeys((r["dataset"], r["model"]) for r in rows):
        d = _select(rows, dataset=ds, model=model)
        per = {}
        for name, alpha in config.triggers.items():
            cell = dict(trigger=name, alpha=float(alpha), rate=rate)
            cell["strategy"] = "many_to_one"
            none = _by_run(d, **cell, regularizer="none")
            if not none:
                continue
            learnt = mean_ci(
                r["asr_before"] - r["clean_asr_before"]
                for r in none.values()
                if "clean_asr_before" in r
            )
            e = {
                "backdoor_learnt": {
                    "asr": rate_ci(r["asr_before"] for r in none.values()),
                    "clean_victim_asr": rate_ci(
                        r["clean_asr_before"]
                        for r in none.values()
                        if "clean_asr_before" in r
                    ),
                    "difference": learnt,
                    "verdict": _verdict_above(learnt),
                    "accuracy_difference": mean_ci(
                        r["clean_val_accuracy_before"] - r["clean_accuracy_before"]
                        for r in none.values()
                        if "clean_accuracy_before" in r
                    ),
                }
            }
            ok = e["backdoor_learnt"]["verdict"]
            if name in config.regularizer_triggers:
                for reg in dict.fromkeys(r["regularizer"] for r in d):
                    if reg == "none":
                        continue
                    with_reg = _by_run(d, **cell, regularizer=reg)
                    diff = _paired(with_reg, none, "asr_before", "asr_before")
                    e[f"lowered_by_{reg}"] = {
                        "asr": rate_ci(r["asr_before"] for r in with_reg.values()),
                        "difference": diff,
                        "verdict": _verdict_below(diff, ok),
                        "paper_average_asr": PAPER_AVERAGE_ASR.get(reg, NOT_AVAILABLE),
                    }
            tuned = mean_ci(r["asr_after"] - r["asr_before"] for r in none.values())
            e["lowered_by_fine_tuning"] = {
                "asr_after": rate_ci(r["asr_after"] for r in none.values()),
                "difference": tuned,
                "accuracy_change": mean_ci(
                    r["clean_val_accuracy_after"] - r["clean_val_accuracy_before"]
                    for r in none.values()
                ),
                "left_vs_clean_victim": mean_ci(
                    r["asr_after"] - r["clean_asr_after"]
                    for r in none.values()
                    if "clean_asr_after" in r
                ),
                "verdict": _verdict_below(tuned, ok),
            }
            per[name] = e
        out[f"{ds}/{model}"] = per
    return out


def pct(s: dict | None) -> str:
    """`mean [low, high]` in percent of a `mean_ci` entry ('-' if absent)."""
    if not s or not s.get("n"):
        return "-"
    if s["ci95_low"] is None:
        return f"{100 * s['mean']:.1f}"
    low, high = 100 * s["ci95_low"], 100 * s["ci95_high"]
    return f"{100 * s['mean']:.1f} [{low:.1f}, {high:.1f}]"


def points(s: dict) -> str:
    """A difference in percentage points with its interval."""
    if not s or not s.get("n"):
        return "-"
    if s["ci95_low"] is None:
        return f"{100 * s['mean']:+.1f}"
    low, high = 100 * s["ci95_low"], 100 * s["ci95_high"]
    return f"{100 * s['mean']:+.1f} [{low:+.1f}, {high:+.1f}]"


def _paper_pct(value) -> str:
    return f"{100 * value:.0f}%" if isinstance(value, float) else value


def markdown(tab: dict, eff: dict) -> str:
    """Every table as markdown (percent, mean [95% interval] over runs), with the
    paper's values beside ours where printed, then the main effects."""
    lines = []

    def block(title, header, body):
        if body:
            lines.extend([title, "", markdown_table(header, body), ""])

    for key, t in tab.items():
        lines.append(f"## {key}\n")
        block(
            "Table 1 (poison counts at the default rate; means over seeds)",
            ["poison class", "N_t", "poisons", "effective rate", "per source class"]
            + ["paper"],
            [
                [
                    str(c),
                    f"{v['class_size']:.0f}",
                    f"{v['n_poisons']:.1f}",
                    f"{v['effective_rate']:.4f}",
                    " ".join(f"{x:.1f}" for x in v["source_counts"]),
                    v["paper"],
                ]
                for c, v in t["table1_counts"].items()
            ],
        )
        block(
            "Table 2 (triggers over every poison class: ASR and clean accuracy, "
            "retrained no / yes)",
            ["trigger", "alpha", "retrained", "ASR", "clean victim ASR", "accuracy"]
            + ["clean victim accuracy", "paper"],
            [
                [
                    name,
                    str(v["alpha"]),
                    "no" if when == "before" else "yes",
                    pct(v[when]["asr"]),
                    pct(v[when]["clean_victim_asr"]),
                    pct(v[when]["accuracy"]),
                    pct(v[when]["clean_victim_accuracy"]),
                    v["paper"],
                ]
                for name, v in t["table2_triggers"].items()
                for when in WHEN
            ],
        )
        block(
            "One-to-one vs many-to-one (ASR, retrained no / yes)",
            ["trigger", "strategy", "ASR (no)", "ASR (yes)", "clean victim ASR"]
            + ["paper"],
            [
                [
                    name,
                    strategy,
                    pct(s["before"]["asr"]),
                    pct(s["after"]["asr"]),
                    pct(s["before"]["clean_victim_asr"]),
                    NOT_AVAILABLE,
                ]
                for name, v in t["strategy"].items()
                for strategy, s in v.items()
            ],
        )
        for which, symbol in (("alpha_curve", "alpha"), ("rate_curve", "lambda")):
            block(
                f"{symbol} curve at the curve class (ASR, retrained no / yes)",
                ["trigger", symbol, "ASR (no)", "ASR (yes)", "paper"],
                [
                    [
                        name,
                        str(x),
                        pct(s["before"]["asr"]),
                        pct(s["after"]["asr"]),
                        NOT_AVAILABLE,
                    ]
                    for name, curve in t[which].items()
                    for x, s in curve.items()
                ],
            )
        block(
            "Regularisers (average over poison classes and seeds)",
            ["regulariser", "trigger", "ASR (no)", "ASR (yes)", "accuracy"]
            + ["paper average ASR"],
            [
                [
                    reg,
                    name,
                    pct(v["average"]["before"]["asr"]),
                    pct(v["average"]["after"]["asr"]),
                    pct(v["average"]["before"]["accuracy"]),
                    _paper_pct(v["paper_average_asr"]),
                ]
                for reg, per in t["regularizers"].items()
                for name, v in per.items()
            ],
        )
        block(
            "Regularisers per poison class (ASR / accuracy, not retrained)",
            ["regulariser", "trigger", "poison class", "ASR", "accuracy"],
            [
                [
                    reg,
                    name,
                    str(c),
                    pct(s["before"]["asr"]),
                    pct(s["before"]["accuracy"]),
                ]
                for reg, per in t["regularizers"].items()
                for name, v in per.items()
                for c, s in v["per_class"].items()
            ],
        )
        rows = []
        for name, e in eff.get(key, {}).items():
            b = e["backdoor_learnt"]
            rows.append(
                [
                    f"backdoor learnt ({name})",
                    f"{pct(b['asr'])} vs clean {pct(b['clean_victim_asr'])}",
                    points(b["difference"]),
                    b["verdict"],
                ]
            )
            rows.append(
                [
                    f"clean accuracy, poisoned minus clean victim ({name})",
                    "-",
                    points(b.get("accuracy_difference")),
                    NO_VERDICT,
                ]
            )
            for k, v in e.items():
                if k.startswith("lowered_by_"):
                    what = k.removeprefix("lowered_by_")
                    ours = pct(v.get("asr", v.get("asr_after")))
                    paper = v.get("paper_average_asr")
                    if paper is not None:
                        ours += f" (paper: {_paper_pct(paper)})"
                    rows.append(
                        [
                            f"lowered by {what} ({name})",
                            ours,
                            points(v["difference"]),
                            v["verdict"],
                        ]
                    )
            tuned = e.get("lowered_by_fine_tuning", {})
            for k, what in (
                ("accuracy_change", "clean accuracy change by fine-tuning"),
                ("left_vs_clean_victim", "ASR left after fine-tuning minus clean"),
            ):
                if k in tuned:
                    rows.append([f"{what} ({name})", "-", points(tuned[k]), NO_VERDICT])
        block(
            "Main effects (paired differences in points, 95% t-intervals over "
            "poison class x seed)",
            ["effect", "ASR", "difference", "verdict"],
            rows,
        )
        lines.append("The paper's findings:\n")
        lines.extend(f"- {k}: {v}" for k, v in PAPER_FINDINGS.items())
        lines.append(
            f"\nPaper values: {PAPER_SOURCE}; '{NOT_AVAILABLE}' where the paper's "
            "number could not be read offline.\n"
        )
    return "\n".join(lines)
