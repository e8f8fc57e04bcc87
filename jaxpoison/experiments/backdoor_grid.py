"""Systematic evaluation of backdoor poisoning (Truong et al. 2020) as a grid.

Protocol (Truong et al. Sec. 4), per dataset:

* Split 76/19/5 into poison-set / clean-set / adversarial test; the poison-set and
  the clean-set each 80/20 into train / val (`data.splits.backdoor_protocol_split`).
* Poison the poison-set (train and val alike) at rate lambda with a trigger: Eq. 8-9,
  floor(lambda * N_t) triggered copies of source-class images, blended by Eq. 7 with
  opacity alpha, supplant rows of the poison class t, so every class keeps its size
  (`attacks.backdoor.poison_rate_plan`). Many-to-one: every class but t is a source;
  one-to-one: `one_to_one_source` only.
* Train the victim on the poison-set train split with early stopping: at most
  `victim.epochs` epochs, stop after `patience` (5) without improvement of the
  poisoned val accuracy, keep the best (`victims.early_stopping`), optionally with
  one of the four regularisers (`victims.regularizers`).
* The defence: fine-tune that victim on the clean-set train split, early-stopped on
  the clean val accuracy.
* Metrics, before and after fine-tuning (`victims.metrics.backdoor_metrics`):
  adversarial success rate (ASR: triggered adversarial-test images of the source
  classes, never of t, classified as t), clean val accuracy (clean-set val),
  poisoned val accuracy (poison-set val, poisons swapped in), and the untriggered
  adversarial-test accuracy.

A run (cell x seed) is one trial of `sweep.run_trials`: its poisons (per-trial
arrays, -1-padded, made on the host) and seeds are its spec; training, fine-tuning
and both evaluations of a chunk of runs are one jitted program. The regulariser
is a static training config, so each (dataset, regulariser) is its own resumable
sweep in `workdir/<dataset>/<regulariser>/`.

Outputs in `workdir`: results.jsonl (one row per run), summary.json (tables per
dataset and the paper's reported trends next to ours), tables.md, and alpha.png /
rate.png (ASR curves before / after fine-tuning) when a curve has two points.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxpoison.attacks import backdoor, triggers
from jaxpoison.data import load_dataset
from jaxpoison.data.splits import backdoor_protocol_split, random_subset
from jaxpoison.errors import UserInputError
from jaxpoison.models import (
    get_model,
    head_variables,
    load_pretrained,
    shipped_weights,
    with_head,
)
from jaxpoison.plots import new_figure, save_figure
from jaxpoison.results import atomic_write_text, write_json, write_jsonl
from jaxpoison.summaries import group_rows
from jaxpoison.sweep import Trial, named_key, run_trials, trial_keys, trial_seeds
from jaxpoison.sweep.sharding import trial_mesh
from jaxpoison.victims import TrainConfig, make_train_data
from jaxpoison.victims.early_stopping import early_stopping_trials
from jaxpoison.victims.metrics import backdoor_metrics

DATASETS = ("cifar10", "cifar10_sample", "flowers")
STRATEGIES = ("many_to_one", "one_to_one")
TRIGGERS = ("black_square", "random_square", "sine", "low_variance")
REGULARIZER_FIELDS = (
    "logit_squeeze",
    "mixup",
    "contrastive",
    "contrastive_margin",
    "snn",
    "snn_temperature",
)
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
METRICS = ("asr", "clean_val_accuracy", "poisoned_val_accuracy")
POISON_FIELDS = ("poison_images", "poison_indices", "poison_labels")
CLEAN_SPLITS = ("poison_train", "poison_val", "clean_train", "clean_val")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One grid cell (a run per seed)."""

    trigger: str
    alpha: float
    rate: float
    strategy: str
    regularizer: str


CELL_FIELDS = tuple(f.name for f in dataclasses.fields(Cell))


def grid_cells(config) -> list[Cell]:
    """The cells Truong et al.'s tables and curves need, deduplicated, in order.

    Per trigger (default alpha a_T, `config.rate`, many-to-one, no regulariser):
    the alpha curve (alphas at the default rate), the rate curve (rates at a_T),
    one-to-one at the default cell; then each regulariser at the default cell of
    each of `regularizer_triggers`.
    """
    cells: list[Cell] = []
    default = dict(rate=float(config.rate), strategy="many_to_one", regularizer="none")
    for name, alpha in config.triggers.items():
        alpha = float(alpha)
        cells.append(Cell(name, alpha, **default))
        for a in config.alphas:
            cells.append(Cell(name, float(a), **default))
        for r in config.rates:
            cells.append(Cell(name, alpha, float(r), "many_to_one", "none"))
        if config.one_to_one:
            cells.append(Cell(name, alpha, float(config.rate), "one_to_one", "none"))
    for reg in config.regularizers:
        if reg == "none":
            continue
        for name in config.regularizer_triggers:
            alpha = float(config.triggers[name])
            cells.append(Cell(name, alpha, float(config.rate), "many_to_one", reg))
    # Each trigger's rate-0 cell trains the same clean victim (no poisons, the
    # seed's key); it stays one run per trigger, since its ASR is the trigger's.
    return list(dict.fromkeys(cells))


def check_config(config) -> tuple[TrainConfig, dict[str, TrainConfig]]:
    """Validates what needs no data; returns the fine-tuning config and the
    victim's training config per regulariser."""
    for what, names, known in (
        ("dataset", config.datasets, DATASETS),
        ("trigger", config.triggers, TRIGGERS),
        ("regularizer_triggers entry", config.regularizer_triggers, config.triggers),
    ):
        if unknown := [n for n in names if n not in known]:
            raise UserInputError(
                f"unknown {what} {unknown[0]!r}; known: {', '.join(known)}"
            )
    problems = {
        "config.datasets is empty": not config.datasets,
        f"seeds={config.seeds}: need at least 1": config.seeds < 1,
        "one_to_one_source must differ from poison_class": config.poison_class
        == config.one_to_one_source,
        "config.regularizers needs a 'none' entry": "none" not in config.regularizers,
        **{
            f"alpha {a} is not in [0, 1]": not 0.0 <= float(a) <= 1.0
            for a in [*config.triggers.values(), *config.alphas]
        },
        **{
            f"poison rate {r} is not in [0, 1]": not 0.0 <= float(r) <= 1.0
            for r in [config.rate, *config.rates]
        },
    }
    for message, bad in problems.items():
        if bad:
            raise UserInputError(message)
    victim = TrainConfig.from_mapping(config.victim)
    regs = {}
    for name, fields in config.regularizers.items():
        if unknown := sorted(set(fields) - set(REGULARIZER_FIELDS)):
            raise UserInputError(
                f"regularizer {name!r}: unknown field(s) {', '.join(unknown)}; "
                f"known: {', '.join(REGULARIZER_FIELDS)}"
            )
        regs[name] = dataclasses.replace(victim, **dict(fields))
    return TrainConfig.from_mapping(config.finetune), regs


def load_images(name: str, config) -> tuple[np.ndarray, np.ndarray, tuple]:
    """All images of a dataset (CIFAR-10: train then test) and labels."""
    if name == "flowers":
        data = load_dataset(
            "flowers", "train", config.flowers_dir, image_size=config.image_size
        )
        return data.images, data.labels, data.class_names
    data_dir = config.data_dir or None
    parts = [load_dataset(name, s, data_dir) for s in ("train", "test")]
    images = np.concatenate([p.images for p in parts])
    labels = np.concatenate([p.labels for p in parts])
    return images, labels, parts[0].class_names


def trigger_functions(config, poison_train_images, held_out_image) -> dict:
    """`fn(key, x) -> T(x)` per trigger name (Truong et al. Sec. 3.2)."""
    params = {"sine": dict(reference_width=int(config.sine_reference_width))}
    if "low_variance" in config.triggers:
        pattern = triggers.low_variance_pattern(
            poison_train_images, held_out_image, seed=int(config.seed)
        )
        params["low_variance"] = dict(pattern=pattern)
    return {n: triggers.make_trigger(n, **params.get(n, {})) for n in config.triggers}


def sources_of(cell: Cell, config):
    return [int(config.one_to_one_source)] if cell.strategy == "one_to_one" else None


def cell_poisons(images, labels, cell: Cell, seed: int, fn, config, split_seed: int):
    """One run's poisons in one split: its plan (Eq. 8-9) and the triggered,
    blended source images (Eq. 7). The trigger's key is fixed by the cell, the seed
    and the split (not by list position), so a run's poisons are the same
    wherever they are recomputed."""
    # Made eagerly on the host, as before the sweep engine (jitted, the blend could
    # round differently), and stored in the specs: a chunk is fully determined.
    plan_seed = [int(config.seed), split_seed, seed, STRATEGIES.index(cell.strategy)]
    plan = backdoor.poison_rate_plan(
        labels,
        int(config.poison_class),
        cell.rate,
        np.random.default_rng(plan_seed).integers(2**31),
        sources_of(cell, config),
    )
    key = named_key(cell, seed, split_seed)
    poisons = backdoor.apply_trigger_to_rows(
        images, plan.source_rows, fn, cell.alpha, key
    )
    return plan, np.asarray(poisons)


def poison_specs(images, labels, runs, fns, config, split_seed: int) -> dict:
    """Every run's poisons of one split as `TrainData` poison fields, padded with
    unused (-1) slots to the run with most."""
    plans, poisons = zip(
        *(
            cell_poisons(images, labels, c, s, fns[c.trigger], config, split_seed)
            for c, s in runs
        ),
        strict=True,
    )
    stacked = backdoor.stack_plans(plans)
    padded = np.zeros((*stacked.poison_indices.shape, *images.shape[1:]), np.float32)
    for i, p in enumerate(poisons):
        padded[i, : len(p)] = p
    return dict(zip(POISON_FIELDS, (padded, *stacked[1:]), strict=True))


def run_specs(runs, cells, part, fns, config) -> dict[str, np.ndarray]:
    """The trial specs of runs `(cell, seed)`: which cell and seed, the training
    keys' seeds, the poisons of the poison-set train and val splits and the
    triggered adversarial test (which images count for the ASR)."""
    seed = np.array([s for _, s in runs])
    adv_x, adv_y = part["adversarial"]
    triggered, eligible = [], []
    for cell, s in runs:
        rows = np.arange(len(adv_y), dtype=np.int32)
        key = named_key(cell, s, 7)
        fn = fns[cell.trigger]
        triggered.append(
            backdoor.apply_trigger_to_rows(adv_x, rows, fn, cell.alpha, key)
        )
        ok = adv_y != config.poison_class  # one-to-one: its source class only
        src = sources_of(cell, config)
        eligible.append(ok if src is None else ok & np.isin(adv_y, src))
    # 1000 * seed + s and 2000 * seed + s + 1, the keys every run had before the
    # sweep engine: a seed's victims share their keys across cells.
    victim_seeds = trial_seeds(config.seed, config.seeds, stride=1000)
    finetune_seeds = trial_seeds(config.seed, config.seeds, stride=2000, offset=1)
    val = poison_specs(*part["poison_val"], runs, fns, config, 2)
    return {
        "cell": np.array([cells.index(c) for c, _ in runs], np.int32),
        "seed": seed.astype(np.int32),
        "victim_seed": victim_seeds[seed],
        "finetune_seed": finetune_seeds[seed],
        **poison_specs(*part["poison_train"], runs, fns, config, 1),
        **{f"val_{k}": v for k, v in val.items()},
        "triggered": np.stack(triggered),
        "eligible": np.stack(eligible),
    }


def victim_model(config, num_classes: int, key):
    """The victim and its starting variables (shipped weights or fresh)."""
    model = get_model(config.model, num_classes=num_classes)
    fresh = model.init(key)
    if config.init == "scratch":
        return model, fresh
    if config.init != "pretrained":
        raise UserInputError(
            f"init must be 'pretrained' or 'scratch', not {config.init!r}"
        )
    model10, variables = load_pretrained(config.model, shipped_weights(config.model))
    if num_classes == model10.num_classes:
        return model, variables
    # Another task: the pretrained extractor with a freshly initialised head.
    return model, with_head(variables, head_variables(fresh))


def with_poisons(data, spec, prefix=""):
    """`data` with a chunk's per-run poisons (spec fields `prefix + poison_*`)."""
    return data._replace(**{k: spec[prefix + k] for k in POISON_FIELDS})


def grid_runs(model, victim, finetune, config, shared, spec) -> dict:
    """A chunk of runs (Truong et al. Sec. 4): each victim trained with early
    stopping on its poisoned poison-set, then fine-tuned on the clean-set (the
    defence); both evaluated. Trials run under `lax.map` on CPU (`trials`)."""
    init, train, val, clean_train, clean_val, adversarial = shared
    poisoned_val = with_poisons(val, spec, "val_")
    trained, before = early_stopping_trials(
        model,
        init,
        with_poisons(train, spec),
        poisoned_val,
        trial_keys(spec["victim_seed"]),
        victim,
        patience=int(config.patience),
        trials=config.trials,
    )
    tuned, after = early_stopping_trials(
        model,
        trained,
        clean_train,
        clean_val,
        trial_keys(spec["finetune_seed"]),
        finetune,
        patience=int(config.finetune_patience),
        variables_axis=0,
        trials=config.trials,
    )

    def evaluate(victims):
        def one(args):
            variables, triggered, eligible, poisons = args
            return backdoor_metrics(
                model,
                variables,
                triggered,
                eligible,
                adversarial,
                poisoned_val._replace(**poisons),
                (clean_val.images, clean_val.labels),
                int(config.poison_class),
            )

        poisons = {k: spec[f"val_{k}"] for k in POISON_FIELDS}
        return jax.lax.map(one, (victims, spec["triggered"], spec["eligible"], poisons))

    stopping = ("epochs_run", "best_epoch", "best_val_accuracy")
    return {
        "before": {k: before[k] for k in stopping},
        "finetune": {k: after[k] for k in stopping},
        "metrics_before": evaluate(trained),
        "metrics_after": evaluate(tuned),
    }


def run_row(dataset, cells, config, train_labels, spec, out) -> dict:
    """A run's row: its cell and seed, the poisons, early stopping, the metrics."""
    n = int(np.sum(spec["poison_indices"] >= 0))
    row = {
        "dataset": dataset,
        **dataclasses.asdict(cells[int(spec["cell"])]),
        "seed": int(spec["seed"]),
        "poison_class": int(config.poison_class),
        "n_poisons": n,
        "poison_class_train_size": int(np.sum(train_labels == config.poison_class)),
        "effective_rate": n / len(train_labels),
        "epochs_run": int(out["before"]["epochs_run"]),
        "best_epoch": int(out["before"]["best_epoch"]),
        "best_val_accuracy": float(out["before"]["best_val_accuracy"]),
        "finetune_epochs_run": int(out["finetune"]["epochs_run"]),
        "finetune_best_val_accuracy": float(out["finetune"]["best_val_accuracy"]),
        "finetune_best_epoch": int(out["finetune"]["best_epoch"]),
        "adversarial_test_size": int(spec["eligible"].sum()),
    }
    for k in out["metrics_before"]:
        row[f"{k}_before"] = float(out["metrics_before"][k])
        row[f"{k}_after"] = float(out["metrics_after"][k])
    return row


def run_dataset(name: str, config, finetune, regs, workdir: str) -> list[dict]:
    """Every run of one dataset, one resumable sweep per regulariser."""
    images, labels, class_names = load_images(name, config)
    num_classes = len(class_names)
    if max(config.poison_class, config.one_to_one_source) >= num_classes:
        raise UserInputError(
            f"poison_class / one_to_one_source out of range for {name} "
            f"({num_classes} classes)"
        )
    keep = random_subset(len(labels), int(config.examples), int(config.seed))
    images, labels = images[keep], labels[keep]
    split = backdoor_protocol_split(
        labels,
        config.split,
        config.inner_split,
        int(config.poison_class),
        int(config.seed),
    )
    part = {k: (images[v], labels[v]) for k, v in split.items()}
    fns = trigger_functions(config, part["poison_train"][0], part["held_out"][0][0])
    cells = grid_cells(config)
    runs = [(c, s) for c in cells for s in range(int(config.seeds))]
    print(
        f"{name}: {len(labels)} images; poison-set train/val "
        f"{len(split['poison_train'])}/{len(split['poison_val'])}, clean-set "
        f"train/val {len(split['clean_train'])}/{len(split['clean_val'])}, "
        f"adversarial test {len(split['adversarial'])}; {len(cells)} cells x "
        f"{config.seeds} seeds = {len(runs)} runs"
    )
    model, init = victim_model(config, num_classes, jax.random.key(config.seed))
    adv_x, adv_y = part["adversarial"]
    shared = (
        init,
        *(make_train_data(*part[k]) for k in CLEAN_SPLITS),
        (jnp.asarray(adv_x, jnp.float32) / 255.0, adv_y),
    )
    row = functools.partial(run_row, name, cells, config, part["poison_train"][1])
    rows = []
    for reg, victim in regs.items():
        group = [(c, s) for c, s in runs if c.regularizer == reg]
        if group:
            trial = Trial(
                functools.partial(grid_runs, model, victim, finetune, config), row
            )
            rows += run_trials(
                trial,
                shared,
                run_specs(group, cells, part, fns, config),
                chunk_size=int(config.chunk_size),
                workdir=os.path.join(workdir, name, reg),
                mesh=trial_mesh(),
                desc=f"{name} {reg}",
            )
    return rows


def _mean_std(values) -> dict:
    v = np.asarray(list(values), np.float64)
    return {"mean": float(v.mean()), "std": float(v.std()), "n": len(v)}


def cell_stats(rows) -> dict:
    """Mean and std over a cell's seeds of each metric, epochs and poisons."""
    out = {}
    for m in (*METRICS, "adversarial_clean_accuracy"):
        for when in ("before", "after"):
            out[f"{m}_{when}"] = _mean_std(r[f"{m}_{when}"] for r in rows)
    out["epochs_run"] = _mean_std(r["epochs_run"] for r in rows)
    out["n_poisons"] = _mean_std(r["n_poisons"] for r in rows)
    return out


def tables(rows: list[dict], config) -> dict:
    """Tables shaped like Truong et al.'s Tables 2-5 and the two curves, per dataset.

    table2_triggers: per trigger at its default cell: ASR, clean and poisoned val
      accuracy (before fine-tuning), next to the clean victim (rate 0) if run.
    table3_strategy: per trigger, many-to-one vs one-to-one.
    table4_regularizers: per regulariser and trigger at the default cell.
    table5_finetuning: per trigger (default cell), every metric before / after.
    alpha_curve / rate_curve: ASR per trigger along alpha / lambda.
    """
    out = {}
    rate = float(config.rate)
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        d = [r for r in rows if r["dataset"] == ds]
        stats = {k: cell_stats(v) for k, v in group_rows(d, CELL_FIELDS).items()}

        def at(trigger, alpha, lam=rate, strategy="many_to_one", reg="none"):
            return stats.get((trigger, float(alpha), float(lam), strategy, reg))  # noqa: B023

        t = {
            k: {}
            for k in (
                "table2_triggers",
                "table3_strategy",
                "table4_regularizers",
                "table5_finetuning",
                "alpha_curve",
                "rate_curve",
            )
        }
        for name, alpha in config.triggers.items():
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
        for reg in config.regularizers:
            for name in config.regularizer_triggers:
                if s := at(name, config.triggers[name], reg=reg):
                    t["table4_regularizers"].setdefault(reg, {})[name] = s
        out[ds] = t
    return out


TREND_LINES = {
    "success_varies": "ASR by trigger: {}",
    "hard_to_detect": "clean val accuracy, poisoned minus clean victim: {} points",
    "regularisation": "ASR change vs no regulariser (points): {}",
    "fine_tuning": "ASR before -> after fine-tuning: {}",
}


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
    """tables.md: every table as markdown, mean +- std over seeds, in percent."""

    def pct(s, key):
        if s is None:
            return "-"
        return f"{100 * s[key]['mean']:.1f} +- {100 * s[key]['std']:.1f}"

    def asr_acc(s):
        if s is None:
            return "-"
        return f"{pct(s, 'asr_before')} / {pct(s, 'clean_val_accuracy_before')}"

    def block(title, header, body):
        return [
            f"{title}\n",
            "| " + " | ".join(header) + " |",
            "|" + " --- |" * len(header),
            *("| " + " | ".join(r) + " |" for r in body),
        ]

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


def plot_curves(tab: dict, which: str, xlabel: str, path: str) -> None:
    """ASR (%) along alpha or lambda per trigger, before and after fine-tuning; a
    panel per dataset with a curve of two points or more, no file without one."""
    panels = {
        ds: {name: c for name, c in t[which].items() if len(c) >= 2}
        for ds, t in tab.items()
    }
    panels = {ds: curves for ds, curves in panels.items() if curves}
    if not panels:
        return
    fig, axes = new_figure(1, len(panels), size=(5 * len(panels), 3.6))
    for ax, (ds, curves) in zip(np.atleast_1d(axes), panels.items(), strict=True):
        for i, (name, curve) in enumerate(curves.items()):
            xs = sorted(curve)
            for when, style in (("before", "-o"), ("after", ":x")):
                ys = [100 * curve[x][f"asr_{when}"]["mean"] for x in xs]
                label = f"{name} ({when} fine-tuning)"
                ax.plot(xs, ys, style, color=f"C{i % 10}", label=label)
        ax.legend(fontsize=6)
        ax.set_title(ds)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("attack success rate (%)")
    save_figure(fig, path)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the grid on every dataset; writes rows, summary, tables and curves."""
    finetune, regs = check_config(config)
    rows, seconds = [], {}
    for name in config.datasets:
        start = time.perf_counter()
        rows += run_dataset(name, config, finetune, regs, workdir)
        seconds[name] = time.perf_counter() - start
    write_jsonl(os.path.join(workdir, "results.jsonl"), rows)
    tab = tables(rows, config)
    trends = our_trends(tab)
    summary = {
        "experiment": "backdoor_grid",
        "victim": f"{config.model} ({config.init}), end to end, early stopping "
        f"(patience {config.patience}, at most {config.victim.epochs} epochs)",
        "runs": len(rows),
        "seconds": seconds,  # this invocation's (runs resumed from chunks are free)
        "tables": tab,
        "paper_trends": PAPER_TRENDS,
        "our_trends": trends,
    }
    write_json(os.path.join(workdir, "summary.json"), summary)
    atomic_write_text(os.path.join(workdir, "tables.md"), markdown(tab, trends))
    plot_curves(tab, "alpha_curve", "alpha (Eq. 7)", os.path.join(workdir, "alpha.png"))
    plot_curves(
        tab,
        "rate_curve",
        "poison rate lambda (Eq. 8)",
        os.path.join(workdir, "rate.png"),
    )
    for ds, lines in trends.items():
        for key, text in lines.items():
            print(f"{ds} {key}: {text}")
    return summary
