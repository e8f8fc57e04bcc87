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
dataset and the paper's reported trends next to ours, `analysis.backdoor_tables`),
tables.md, and alpha.png / rate.png (ASR curves before / after fine-tuning) when a
curve has two points.
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

from jaxpoison.analysis.backdoor_tables import (
    PAPER_TRENDS,
    Cell,
    markdown,
    our_trends,
    tables,
)
from jaxpoison.attacks import backdoor, triggers
from jaxpoison.checks import check_known, require
from jaxpoison.data import load_dataset
from jaxpoison.data.splits import backdoor_protocol_split, random_subset
from jaxpoison.errors import UserInputError
from jaxpoison.models import initial_model
from jaxpoison.plots import label, panels, save_figure
from jaxpoison.results import atomic_write_text, write_json, write_jsonl
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
POISON_FIELDS = ("poison_images", "poison_indices", "poison_labels")
CLEAN_SPLITS = ("poison_train", "poison_val", "clean_train", "clean_val")


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
    check_known("dataset", config.datasets, DATASETS)
    check_known("trigger", config.triggers, TRIGGERS)
    known = list(config.triggers)
    check_known("regularizer_triggers entry", config.regularizer_triggers, known)
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
        require(not bad, message)
    victim = TrainConfig.from_mapping(config.victim)
    regs = {}
    for name, fields in config.regularizers.items():
        check_known(f"regularizer {name!r} field", fields, REGULARIZER_FIELDS)
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
    key = jax.random.key(config.seed)
    model, init = initial_model(config.model, num_classes, key, config.init)
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


def plot_curves(tab: dict, which: str, xlabel: str, path: str) -> None:
    """ASR (%) along alpha or lambda per trigger, before and after fine-tuning; a
    panel per dataset with a curve of two points or more, no file without one."""
    shown = {
        ds: {name: c for name, c in t[which].items() if len(c) >= 2}
        for ds, t in tab.items()
    }
    shown = {ds: curves for ds, curves in shown.items() if curves}
    if not shown:
        return
    fig, axes = panels(len(shown), size=(5.0, 3.6))
    for ax, (ds, curves) in zip(axes, shown.items(), strict=True):
        for i, (name, curve) in enumerate(curves.items()):
            xs = sorted(curve)
            for when, style in (("before", "-o"), ("after", ":x")):
                ys = [100 * curve[x][f"asr_{when}"]["mean"] for x in xs]
                label_ = f"{name} ({when} fine-tuning)"
                ax.plot(xs, ys, style, color=f"C{i % 10}", label=label_)
        label(ax, ds, xlabel, "attack success rate (%)", legend_size=6)
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
    tab = tables(
        rows,
        config.rate,
        config.triggers,
        list(config.regularizers),
        config.regularizer_triggers,
    )
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
