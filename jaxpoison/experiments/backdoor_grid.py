"""Systematic evaluation of backdoor poisoning (Truong et al. 2020) as a grid.

Protocol (Truong et al. Sec. 4), per dataset:

* Split 76/19/5 into poison-set / clean-set / adversarial test; the poison-set and
  the clean-set each 80/20 into train / val (`data.split_fractions`).
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
* Metrics, before and after fine-tuning: adversarial success rate (ASR: triggered
  adversarial-test images of the source classes, never of t, classified as t),
  clean val accuracy (clean-set val), poisoned val accuracy (poison-set val, poisons
  swapped in), and the untriggered adversarial-test accuracy.

Vectorisation: a run is fixed by its poisons (per-trial arrays, -1-padded), its seed
and its static training config. Every cell that shares the regulariser -- any
trigger, alpha, rate, strategy, seed -- is one trial of one jitted program
(`early_stopping_trials`), and the fine-tuning of all runs of a dataset is one more.

Outputs in `workdir`: results.jsonl (one row per run), summary.json (tables per
dataset and the paper's reported trends next to ours), tables.md, alpha.png and
rate.png (ASR curves before / after fine-tuning).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import time
import zlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxpoison.attacks import backdoor, triggers
from jaxpoison.data import load_dataset, split_fractions
from jaxpoison.errors import UserInputError
from jaxpoison.models import (
    get_model,
    head_variables,
    load_pretrained,
    shipped_weights,
    with_head,
)
from jaxpoison.results import atomic_write_text, write_json, write_jsonl
from jaxpoison.victims import TrainConfig, make_train_data
from jaxpoison.victims.early_stopping import early_stopping_trials
from jaxpoison.victims.train import class_logits, poisoned_batch

DATASETS = ("cifar10", "cifar10_sample", "flowers")
STRATEGIES = ("many_to_one", "one_to_one")
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


@dataclasses.dataclass(frozen=True)
class Cell:
    """One grid cell (a run per seed)."""

    trigger: str
    alpha: float
    rate: float
    strategy: str
    regularizer: str


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
    return list(dict.fromkeys(cells))


def check_config(config) -> tuple[TrainConfig, TrainConfig, dict]:
    """Validates what needs no data; returns (victim, fine-tune, per-reg configs)."""
    for name in config.datasets:
        if name not in DATASETS:
            raise UserInputError(
                f"unknown dataset {name!r}; known: {', '.join(DATASETS)}"
            )
    if not config.datasets:
        raise UserInputError("config.datasets is empty")
    for name in config.triggers:
        if name not in ("black_square", "random_square", "sine", "low_variance"):
            raise UserInputError(
                f"unknown trigger {name!r}; known: black_square, random_square, "
                "sine, low_variance"
            )
    for name in config.regularizer_triggers:
        if name not in config.triggers:
            raise UserInputError(
                f"regularizer_triggers names {name!r}, which is not in triggers"
            )
    for a in [*config.triggers.values(), *config.alphas]:
        if not 0.0 <= float(a) <= 1.0:
            raise UserInputError(f"alpha {a} is not in [0, 1]")
    for r in [config.rate, *config.rates]:
        if not 0.0 <= float(r) <= 1.0:
            raise UserInputError(f"poison rate {r} is not in [0, 1]")
    if config.seeds < 1:
        raise UserInputError(f"seeds={config.seeds}: need at least 1")
    if config.poison_class == config.one_to_one_source:
        raise UserInputError("one_to_one_source must differ from poison_class")
    if "none" not in config.regularizers:
        raise UserInputError("config.regularizers needs a 'none' entry")
    victim = TrainConfig.from_mapping(config.victim)
    finetune = TrainConfig.from_mapping(config.finetune)
    regs = {}
    for name, fields in config.regularizers.items():
        unknown = set(fields) - set(REGULARIZER_FIELDS)
        if unknown:
            raise UserInputError(
                f"regularizer {name!r}: unknown field(s) {', '.join(sorted(unknown))}"
                f"; known: {', '.join(REGULARIZER_FIELDS)}"
            )
        regs[name] = dataclasses.replace(victim, **dict(fields))
    return victim, finetune, regs


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


def protocol_split(labels: np.ndarray, config, seed: int) -> dict[str, np.ndarray]:
    """Truong et al.'s split (rows of `labels`): poison/clean train/val, adversarial.

    The adversarial test keeps no poison-class image. Its first row is held out
    (the low-variance trigger's "image not in the training data") and not tested.
    """
    poison, clean, adv = split_fractions(len(labels), config.split, seed)
    out = {}
    for name, part, s in (("poison", poison, 1), ("clean", clean, 2)):
        tr, va = split_fractions(len(part), config.inner_split, seed + s)
        out[f"{name}_train"], out[f"{name}_val"] = part[tr], part[va]
    out["held_out"] = adv[:1]
    adv = adv[1:]
    out["adversarial"] = adv[labels[adv] != config.poison_class]
    return out


def trigger_functions(config, poison_train_images, held_out_image) -> dict:
    """`fn(key, x) -> T(x)` per trigger name."""
    fns = {}
    for name in config.triggers:
        if name == "sine":
            fns[name] = triggers.make_trigger(
                "sine", reference_width=int(config.sine_reference_width)
            )
        elif name == "low_variance":
            pattern = triggers.low_variance_pattern(
                poison_train_images, held_out_image, seed=int(config.seed)
            )
            fns[name] = triggers.make_trigger("low_variance", pattern=pattern)
        else:
            fns[name] = triggers.make_trigger(name)
    return fns


def sources_of(cell: Cell, config):
    return [int(config.one_to_one_source)] if cell.strategy == "one_to_one" else None


def trial_key(cell: Cell, seed: int, salt: int) -> jax.Array:
    """A PRNG key fixed by the cell, the seed and `salt` (not by list position),
    so a trial's random trigger draws are the same wherever it is recomputed."""
    return jax.random.key(zlib.crc32(f"{cell}|{seed}|{salt}".encode()))


def make_poisons(images, labels, cells_seeds, fns, config, split_seed: int):
    """Per-trial poisons of one split, padded to one shape: TrainData fields."""
    plans, poisons = [], []
    for cell, s in cells_seeds:
        plan_seed = [int(config.seed), split_seed, s, STRATEGIES.index(cell.strategy)]
        plan = backdoor.poison_rate_plan(
            labels,
            int(config.poison_class),
            cell.rate,
            np.random.default_rng(plan_seed).integers(2**31),
            sources_of(cell, config),
        )
        key = trial_key(cell, s, split_seed)
        poisons.append(
            np.asarray(
                backdoor.apply_trigger_to_rows(
                    images, plan.source_rows, fns[cell.trigger], cell.alpha, key
                )
            )
        )
        plans.append(plan)
    stacked = backdoor.stack_plans(plans)
    size = stacked.poison_indices.shape[1]
    shape = images.shape[1:]
    padded = np.zeros((len(plans), size, *shape), np.float32)
    for i, p in enumerate(poisons):
        padded[i, : len(p)] = p
    counts = np.array([len(p.poison_indices) for p in plans])
    return (
        jnp.asarray(padded),
        jnp.asarray(stacked.poison_indices),
        jnp.asarray(stacked.poison_labels),
        counts,
    )


def adversarial_images(images, labels, cells_seeds, fns, config):
    """Triggered adversarial-test images per trial and which ones count for ASR."""
    xs, eligible = [], []
    rows = np.arange(len(labels), dtype=np.int32)
    for cell, s in cells_seeds:
        key = trial_key(cell, s, 7)
        xs.append(
            backdoor.apply_trigger_to_rows(
                images, rows, fns[cell.trigger], cell.alpha, key
            )
        )
        src = sources_of(cell, config)
        ok = labels != config.poison_class
        eligible.append(ok if src is None else ok & np.isin(labels, src))
    return jnp.stack(xs), jnp.asarray(np.stack(eligible))


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


def _evaluate_fn(model):
    """Jitted metrics of many victims (`lax.map` over trials).

    Per trial: ASR on its triggered adversarial images (those `eligible`), accuracy
    on the untriggered adversarial images, on its poisoned val split (poisons
    swapped in as in training) and on the clean val split.
    """

    def one(variables, adv_x, eligible, adv_clean, adv_labels, pval, clean_val):
        def predict(x):
            return jnp.argmax(class_logits(model.apply(variables, x)[0]), -1)

        poison_class, pval = pval
        hits = (predict(adv_x) == poison_class) & eligible
        px, py, _, _, _ = poisoned_batch(pval, jnp.arange(pval.images.shape[0]))
        clean_x = clean_val[0].astype(jnp.float32) / 255.0
        return {
            "asr": hits.sum() / jnp.maximum(eligible.sum(), 1),
            "adversarial_clean_accuracy": jnp.mean(predict(adv_clean) == adv_labels),
            "poisoned_val_accuracy": jnp.mean(predict(px) == py),
            "clean_val_accuracy": jnp.mean(predict(clean_x) == clean_val[1]),
        }

    def run(variables, adv_x, eligible, adv_clean, adv_labels, pval, clean_val):
        poison_class, val = pval

        def trial(i):
            v = jax.tree.map(lambda a: a[i], variables)
            val_i = val._replace(
                poison_images=val.poison_images[i],
                poison_indices=val.poison_indices[i],
                poison_labels=val.poison_labels[i],
            )
            return one(
                v,
                adv_x[i],
                eligible[i],
                adv_clean,
                adv_labels,
                (poison_class, val_i),
                clean_val,
            )

        return jax.lax.map(trial, jnp.arange(adv_x.shape[0]))

    return jax.jit(run)


def run_dataset(name: str, config, victim, finetune, regs) -> tuple[list[dict], float]:
    """Every run of one dataset: (one row per (cell, seed), seconds taken)."""
    images, labels, class_names = load_images(name, config)
    num_classes = len(class_names)
    if max(config.poison_class, config.one_to_one_source) >= num_classes:
        raise UserInputError(
            f"poison_class / one_to_one_source out of range for {name} "
            f"({num_classes} classes)"
        )
    rng = np.random.default_rng(int(config.seed))
    if config.examples and config.examples < len(labels):
        keep = np.sort(rng.choice(len(labels), int(config.examples), replace=False))
        images, labels = images[keep], labels[keep]
    split = protocol_split(labels, config, int(config.seed))
    part = {k: (images[v], labels[v]) for k, v in split.items()}
    fns = trigger_functions(config, part["poison_train"][0], part["held_out"][0][0])
    cells = grid_cells(config)
    trials = [(c, s) for c in cells for s in range(int(config.seeds))]
    print(
        f"{name}: {len(labels)} images; poison-set train/val "
        f"{len(split['poison_train'])}/{len(split['poison_val'])}, clean-set "
        f"train/val {len(split['clean_train'])}/{len(split['clean_val'])}, "
        f"adversarial test {len(split['adversarial'])}; {len(cells)} cells x "
        f"{config.seeds} seeds = {len(trials)} runs"
    )
    model, init_vars = victim_model(config, num_classes, jax.random.key(config.seed))
    tr_x, tr_y = part["poison_train"]
    va_x, va_y = part["poison_val"]
    trained, metrics_before, order = [], [], []
    start = time.perf_counter()
    for reg, cfg in regs.items():
        group = [i for i, (c, _) in enumerate(trials) if c.regularizer == reg]
        if not group:
            continue
        cs = [trials[i] for i in group]
        p_img, p_idx, p_lab, counts = make_poisons(tr_x, tr_y, cs, fns, config, 1)
        v_img, v_idx, v_lab, _ = make_poisons(va_x, va_y, cs, fns, config, 2)
        data = make_train_data(tr_x, tr_y, p_img, p_idx, p_lab)
        val = make_train_data(va_x, va_y, v_img, v_idx, v_lab)
        keys = jnp.stack([jax.random.key(1000 * config.seed + s) for _, s in cs])
        variables, m = early_stopping_trials(
            model,
            init_vars,
            data,
            val,
            keys,
            cfg,
            patience=int(config.patience),
            trials=config.trials,
        )
        trained.append(variables)
        metrics_before.append({**jax.tree.map(np.asarray, m), "n_poisons": counts})
        order.extend(group)
        print(
            f"  {reg}: {len(group)} runs trained ({time.perf_counter() - start:.0f} s)"
        )
    trained = jax.tree.map(lambda *xs: jnp.concatenate(xs), *trained)
    before = {
        k: np.concatenate([m[k] for m in metrics_before])
        for k in ("epochs_run", "best_epoch", "best_val_accuracy", "n_poisons")
    }
    trials = [trials[i] for i in order]
    # The defence: fine-tune every poisoned victim on the clean-set train split.
    ct_x, ct_y = part["clean_train"]
    cv_x, cv_y = part["clean_val"]
    ft_keys = jnp.stack([jax.random.key(2000 * config.seed + s + 1) for _, s in trials])
    tuned, ft_metrics = early_stopping_trials(
        model,
        trained,
        make_train_data(ct_x, ct_y),
        make_train_data(cv_x, cv_y),
        ft_keys,
        finetune,
        patience=int(config.finetune_patience),
        variables_axis=0,
        trials=config.trials,
    )
    print(f"  fine-tuned {len(trials)} runs ({time.perf_counter() - start:.0f} s)")
    # Evaluate before and after.
    p_img, p_idx, p_lab, _ = make_poisons(va_x, va_y, trials, fns, config, 2)
    adv_rows_x, adv_rows_y = part["adversarial"]
    adv_x, eligible = adversarial_images(adv_rows_x, adv_rows_y, trials, fns, config)
    evaluate = _evaluate_fn(model)
    pval = (
        jnp.asarray(config.poison_class),
        jax.tree.map(jnp.asarray, make_train_data(va_x, va_y, p_img, p_idx, p_lab)),
    )
    shared = (
        jnp.asarray(adv_rows_x, jnp.float32) / 255.0,
        jnp.asarray(adv_rows_y),
        pval,
        (jnp.asarray(cv_x), jnp.asarray(cv_y)),
    )
    ev_before = jax.tree.map(np.asarray, evaluate(trained, adv_x, eligible, *shared))
    ev_after = jax.tree.map(np.asarray, evaluate(tuned, adv_x, eligible, *shared))
    elapsed = time.perf_counter() - start
    ft_metrics = jax.tree.map(np.asarray, ft_metrics)
    n_t = int(np.sum(tr_y == config.poison_class))
    rows = []
    for i, (cell, s) in enumerate(trials):
        row = {
            "dataset": name,
            **dataclasses.asdict(cell),
            "seed": s,
            "poison_class": int(config.poison_class),
            "n_poisons": int(before["n_poisons"][i]),
            "poison_class_train_size": n_t,
            "effective_rate": int(before["n_poisons"][i]) / len(tr_y),
            "epochs_run": int(before["epochs_run"][i]),
            "best_epoch": int(before["best_epoch"][i]),
            "best_val_accuracy": float(before["best_val_accuracy"][i]),
            "finetune_epochs_run": int(ft_metrics["epochs_run"][i]),
            "finetune_best_val_accuracy": float(ft_metrics["best_val_accuracy"][i]),
            "finetune_best_epoch": int(ft_metrics["best_epoch"][i]),
            "adversarial_test_size": int(eligible[i].sum()),
        }
        for k in ev_before:
            row[f"{k}_before"] = float(ev_before[k][i])
            row[f"{k}_after"] = float(ev_after[k][i])
        rows.append(row)
    print(
        f"  {len(trials)} runs (+ fine-tuning) in {elapsed:.0f} s: "
        f"{3600 * len(trials) / elapsed:.0f} runs/hour"
    )
    return rows, elapsed


def _mean_std(values) -> dict:
    v = np.asarray(list(values), np.float64)
    return {
        "mean": float(v.mean()),
        "std": float(v.std()),
        "n": len(v),
    }


def _select(rows, **kw):
    return [r for r in rows if all(r[k] == v for k, v in kw.items())]


METRICS = ("asr", "clean_val_accuracy", "poisoned_val_accuracy")


def _cell_stats(rows) -> dict:
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
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        d = _select(rows, dataset=ds)
        rate = float(config.rate)
        t2, t3, t4, t5, ac, rc = {}, {}, {}, {}, {}, {}
        for name, alpha in config.triggers.items():
            alpha = float(alpha)
            base = _select(
                d,
                trigger=name,
                alpha=alpha,
                rate=rate,
                strategy="many_to_one",
                regularizer="none",
            )
            if not base:
                continue
            stats = _cell_stats(base)
            clean = _select(d, trigger=name, alpha=alpha, rate=0.0, regularizer="none")
            t2[name] = {
                "alpha": alpha,
                "rate": rate,
                **{f"{m}": stats[f"{m}_before"] for m in METRICS},
                "clean_victim": _cell_stats(clean) if clean else None,
            }
            t5[name] = stats
            one = _select(
                d,
                trigger=name,
                alpha=alpha,
                rate=rate,
                strategy="one_to_one",
                regularizer="none",
            )
            t3[name] = {
                "many_to_one": stats,
                "one_to_one": _cell_stats(one) if one else None,
            }
            ac[name] = {
                a: _cell_stats(sel)
                for a in sorted({r["alpha"] for r in d})
                if (
                    sel := _select(
                        d,
                        trigger=name,
                        alpha=a,
                        rate=rate,
                        regularizer="none",
                        strategy="many_to_one",
                    )
                )
            }
            rc[name] = {
                lam: _cell_stats(sel)
                for lam in sorted({r["rate"] for r in d})
                if (
                    sel := _select(
                        d,
                        trigger=name,
                        alpha=alpha,
                        rate=lam,
                        regularizer="none",
                        strategy="many_to_one",
                    )
                )
            }
        for reg in config.regularizers:
            for name in config.regularizer_triggers:
                sel = _select(
                    d,
                    trigger=name,
                    alpha=float(config.triggers[name]),
                    rate=rate,
                    strategy="many_to_one",
                    regularizer=reg,
                )
                if sel:
                    t4.setdefault(reg, {})[name] = _cell_stats(sel)
        out[ds] = {
            "table2_triggers": t2,
            "table3_strategy": t3,
            "table4_regularizers": t4,
            "table5_finetuning": t5,
            "alpha_curve": ac,
            "rate_curve": rc,
        }
    return out


def our_trends(tab: dict) -> dict:
    """Our numbers against each of the paper's findings, one line each."""
    out = {}
    for ds, t in tab.items():
        lines = {}
        asr = {k: v["asr"]["mean"] for k, v in t["table2_triggers"].items()}
        if asr:
            lines["success_varies"] = "ASR by trigger: " + ", ".join(
                f"{k} {100 * v:.1f}%" for k, v in asr.items()
            )
        gaps = [
            v["clean_val_accuracy"]["mean"]
            - v["clean_victim"]["clean_val_accuracy_before"]["mean"]
            for v in t["table2_triggers"].values()
            if v["clean_victim"]
        ]
        if gaps:
            lines["hard_to_detect"] = (
                "clean val accuracy, poisoned minus clean victim: "
                + ", ".join(f"{100 * g:+.1f}" for g in gaps)
                + " points"
            )
        regs = t["table4_regularizers"]
        if "none" in regs:
            parts = []
            for reg, per in regs.items():
                if reg == "none":
                    continue
                for trig, s in per.items():
                    ref = regs["none"].get(trig)
                    if ref:
                        d = s["asr_before"]["mean"] - ref["asr_before"]["mean"]
                        parts.append(f"{reg}/{trig} {100 * d:+.1f}")
            if parts:
                lines["regularisation"] = (
                    "ASR change vs no regulariser (points): " + ", ".join(parts)
                )
        ft = [
            (
                k,
                v["asr_before"]["mean"],
                v["asr_after"]["mean"],
                v["clean_val_accuracy_after"]["mean"]
                - v["clean_val_accuracy_before"]["mean"],
            )
            for k, v in t["table5_finetuning"].items()
        ]
        if ft:
            lines["fine_tuning"] = "ASR before -> after fine-tuning: " + ", ".join(
                f"{k} {100 * b:.1f}% -> {100 * a:.1f}% (clean acc {100 * g:+.1f})"
                for k, b, a, g in ft
            )
        out[ds] = lines
    return out


def markdown(tab: dict, trends: dict) -> str:
    """tables.md: every table as markdown, mean +- std over seeds, in percent."""

    def pct(s):
        return "-" if s is None else f"{100 * s['mean']:.1f} +- {100 * s['std']:.1f}"

    lines = []
    for ds, t in tab.items():
        lines.append(f"## {ds}\n")
        lines.append("Table 2 (triggers, before fine-tuning)\n")
        lines.append(
            "| trigger | alpha | ASR | clean val acc | poisoned val acc | "
            "clean victim ASR | clean victim clean acc |"
        )
        lines.append("| --- | --- | --- | --- | --- | --- | --- |")
        for k, v in t["table2_triggers"].items():
            cv = v["clean_victim"]
            lines.append(
                f"| {k} | {v['alpha']} | {pct(v['asr'])} | "
                f"{pct(v['clean_val_accuracy'])} | {pct(v['poisoned_val_accuracy'])} "
                f"| {pct(cv['asr_before']) if cv else '-'} | "
                f"{pct(cv['clean_val_accuracy_before']) if cv else '-'} |"
            )
        lines.append("\nTable 3 (strategy: ASR / clean val acc, before fine-tuning)\n")
        lines.append("| trigger | many-to-one | one-to-one |")
        lines.append("| --- | --- | --- |")
        for k, v in t["table3_strategy"].items():
            one = v["one_to_one"]
            many = v["many_to_one"]
            lines.append(
                f"| {k} | {pct(many['asr_before'])} / "
                f"{pct(many['clean_val_accuracy_before'])} | "
                + (
                    f"{pct(one['asr_before'])} / "
                    f"{pct(one['clean_val_accuracy_before'])}"
                    if one
                    else "-"
                )
                + " |"
            )
        lines.append(
            "\nTable 4 (regularisers: ASR / clean val acc, before fine-tuning)\n"
        )
        lines.append("| regulariser | trigger | ASR | clean val acc |")
        lines.append("| --- | --- | --- | --- |")
        for reg, per in t["table4_regularizers"].items():
            for k, s in per.items():
                lines.append(
                    f"| {reg} | {k} | {pct(s['asr_before'])} | "
                    f"{pct(s['clean_val_accuracy_before'])} |"
                )
        lines.append("\nTable 5 (clean fine-tuning: before -> after)\n")
        lines.append("| trigger | ASR | clean val acc | poisoned val acc |")
        lines.append("| --- | --- | --- | --- |")
        for k, s in t["table5_finetuning"].items():
            lines.append(
                f"| {k} | {pct(s['asr_before'])} -> {pct(s['asr_after'])} | "
                f"{pct(s['clean_val_accuracy_before'])} -> "
                f"{pct(s['clean_val_accuracy_after'])} | "
                f"{pct(s['poisoned_val_accuracy_before'])} -> "
                f"{pct(s['poisoned_val_accuracy_after'])} |"
            )
        lines.append("\nTrends: the paper (abstract) / ours\n")
        for key, text in PAPER_TRENDS.items():
            ours = trends.get(ds, {}).get(key, "not run")
            lines.append(f"- {key}: paper: {text}. Ours: {ours}.")
        lines.append("")
    return "\n".join(lines)


def plot_curves(tab: dict, which: str, xlabel: str, path: str) -> None:
    """ASR along alpha or lambda, per trigger; a panel per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tab), figsize=(5 * len(tab), 3.6), squeeze=False)
    for ax, (ds, t) in zip(axes[0], tab.items(), strict=True):
        for (name, curve), color in zip(
            t[which].items(), itertools.cycle(plt.cm.tab10.colors), strict=False
        ):
            if len(curve) < 2:
                continue
            xs = sorted(curve)
            for when, style in (("before", "-o"), ("after", ":x")):
                ys = [100 * curve[x][f"asr_{when}"]["mean"] for x in xs]
                ax.plot(
                    xs, ys, style, color=color, label=f"{name} ({when} fine-tuning)"
                )
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
        ax.set_title(ds)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("adversarial success rate (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def config_digest(config) -> str:
    """A digest of everything that decides a grid's rows (the whole config)."""
    text = json.dumps(config.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def finished_dataset(name: str, config, workdir: str, compute):
    """A dataset's (rows, seconds), computed once and kept in `workdir/datasets`.

    Resume at dataset granularity: a rerun of the same command skips datasets whose
    file exists (written atomically after the dataset's last run). A file made by a
    different config stops the run with one line instead of mixing grids.
    """
    path = os.path.join(workdir, "datasets", f"{name}.json")
    digest = config_digest(config)
    if os.path.exists(path):
        with open(path) as f:
            kept = json.load(f)
        if kept["config_digest"] != digest:
            raise UserInputError(
                f"{workdir} holds a grid made with another config; use a new --workdir"
            )
        print(f"{name}: {len(kept['rows'])} runs already finished, skipped")
        return kept["rows"], kept["seconds"]
    rows, seconds = compute()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json(path, {"config_digest": digest, "rows": rows, "seconds": seconds})
    return rows, seconds


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the grid on every dataset; writes rows, summary, tables and curves."""
    victim, finetune, regs = check_config(config)
    os.makedirs(workdir, exist_ok=True)
    rows, seconds = [], {}
    for name in config.datasets:
        ds_rows, elapsed = finished_dataset(
            name,
            config,
            workdir,
            lambda n=name: run_dataset(n, config, victim, finetune, regs),
        )
        rows.extend(ds_rows)
        seconds[name] = elapsed
    write_jsonl(os.path.join(workdir, "results.jsonl"), rows)
    tab = tables(rows, config)
    trends = our_trends(tab)
    summary = {
        "experiment": "backdoor_grid",
        "victim": f"{config.model} ({config.init}), end to end, early stopping "
        f"(patience {config.patience}, at most {victim.epochs} epochs)",
        "runs": len(rows),
        "seconds": seconds,
        "runs_per_hour": {
            k: 3600 * sum(r["dataset"] == k for r in rows) / v
            for k, v in seconds.items()
        },
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
