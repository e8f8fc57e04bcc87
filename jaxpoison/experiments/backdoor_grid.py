"""Systematic evaluation of backdoor poisoning (Truong et al. 2020) as a grid.

Protocol (Truong et al. Sec. 3-4), per dataset and architecture:

* Split 76/19/5 into poison-set / clean-set / adversarial test; the poison-set and
  the clean-set each 80/20 into train / val (`data.splits.backdoor_protocol_split`;
  one split for every poison class).
* Poison the poison-set (train and val alike) at rate lambda with a trigger: Eq. 8-9,
  floor(lambda * N_t) triggered copies of source-class images, blended by Eq. 7 with
  opacity alpha, supplant rows of the poison class t, so every class keeps its size
  (`attacks.backdoor.poison_rate_plan`). Many-to-one: every class but t is a source;
  one-to-one: class (t + `one_to_one_offset`) mod C only. The poison class ranges
  over every class (`poison_classes`, default all).
* Train the victim on the poison-set train split (Sec. 4.3: Adam, lr 1e-5,
  mini-batch 32) with early stopping: at most `victim.epochs` epochs, stop after
  `patience` (5) without improvement of the poisoned val accuracy, keep the best
  (`victims.early_stopping`), optionally with one of the four regularisers
  (`victims.regularizers`).
* The defence (Sec. 3.3): train that victim on the clean-set train split for a
  fixed `finetune.epochs` epochs (no early stopping: that was the first pass's).
* Metrics, before and after fine-tuning ("retrained no / yes";
  `victims.metrics.backdoor_metrics`): the attack success rate (ASR: triggered
  adversarial-test images of the source classes, never of t, classified as t),
  read from each victim's confusion counts on the triggered test; clean val
  accuracy (clean-set val), poisoned val accuracy (poison-set val, poisons
  swapped in), and the untriggered adversarial-test accuracy.
* The clean victim, one per seed: the same training on the unpoisoned poison-set
  and the same fine-tuning, tested with every trigger; its ASR towards each t (on
  the same triggered images) is the rate a backdoor must beat.

Cells (`grid_cells`): per trigger at its alpha and the default rate, many-to-one,
every poison class (Table 2) and one-to-one (every poison class); the alpha and
rate curves at the curve class (truck for CIFAR-10, rose for flowers); every
regulariser at the default cell of `regularizer_triggers`, every poison class.

A run (cell x seed) is one trial of `sweep.run_trials`: its poisons (per-trial
arrays, -1-padded, made on the host) and seeds are its spec; the triggered test
sets are shared (one per trigger, alpha and seed) and a spec names its set;
training, fine-tuning and both evaluations of a chunk of runs are one jitted
program. Each (dataset, architecture) has one resumable sweep per regulariser
(`workdir/<dataset>/<model>/<regulariser>/`: the regulariser is a static
training config); the clean victims lead the sweep without one.

Outputs in `workdir`: results.jsonl (one row per run and per clean victim),
summary.json (`analysis.backdoor_tables`: the tables, the main effects with
paired 95% intervals and verdicts, the paper's printed values), tables.md, and
the figures alpha.png / rate.png (ASR along alpha / lambda at the curve class,
retrained no / yes) and regularizers.png (ASR and accuracy per regulariser and
poison class), each only when it has data.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxpoison.analysis.backdoor_tables import (
    WHEN,
    Cell,
    asr_counts,
    effects,
    markdown,
    one_to_one_source,
    pct,
    points,
    tables,
)
from jaxpoison.attacks import backdoor, triggers
from jaxpoison.checks import check_known, require
from jaxpoison.data import load_dataset
from jaxpoison.data.splits import backdoor_protocol_split, random_subset
from jaxpoison.errors import UserInputError
from jaxpoison.models import cifar10_weights, initial_model
from jaxpoison.plots import draw_rates, label, panels, save_figure
from jaxpoison.results import atomic_write_text, write_json, write_jsonl
from jaxpoison.sweep import Trial, named_key, run_trials, trial_keys, trial_seeds
from jaxpoison.sweep.sharding import trial_mesh
from jaxpoison.victims import TrainConfig, make_train_data, train_vmapped
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
    "contrastive_form",
    "snn",
    "snn_temperature",
)
POISON_FIELDS = ("poison_images", "poison_indices", "poison_labels")
CLEAN_SPLITS = ("poison_train", "poison_val", "clean_train", "clean_val")
METRICS = ("clean_val_accuracy", "poisoned_val_accuracy", "adversarial_clean_accuracy")


def grid_cells(config, dataset: str, num_classes: int) -> list[Cell]:
    """The poisoned cells Truong et al.'s outputs need, deduplicated, in order.

    Per trigger (its alpha a_T, `config.rate`, no regulariser): many-to-one and
    (`one_to_one`) one-to-one at every poison class; the alpha curve (`alphas`)
    and the rate curve (`rates` above 0; lambda 0 is the clean victim) at the
    dataset's curve class. Then each regulariser at the default cell of each of
    `regularizer_triggers`, every poison class.
    """
    classes = [int(c) for c in config.poison_classes] or list(range(num_classes))
    curve = int(config.curve_class[dataset])
    rate = float(config.rate)
    cells: list[Cell] = []
    for name, alpha in config.triggers.items():
        alpha = float(alpha)
        strategies = STRATEGIES if config.one_to_one else STRATEGIES[:1]
        for strategy in strategies:
            cells += [Cell(name, alpha, rate, strategy, "none", t) for t in classes]
        for a in config.alphas:
            cells.append(Cell(name, float(a), rate, "many_to_one", "none", curve))
        for r in config.rates:
            if float(r) > 0:
                cells.append(Cell(name, alpha, float(r), "many_to_one", "none", curve))
    for reg in config.regularizers:
        if reg == "none":
            continue
        for name in config.regularizer_triggers:
            alpha = float(config.triggers[name])
            cells += [Cell(name, alpha, rate, "many_to_one", reg, t) for t in classes]
    return list(dict.fromkeys(cells))


def check_config(config) -> tuple[TrainConfig, dict[str, TrainConfig]]:
    """Validates what needs no data; returns the fine-tuning config and the
    victim's training config per regulariser."""
    check_known("dataset", config.datasets, DATASETS)
    check_known("trigger", config.triggers, TRIGGERS)
    known = list(config.triggers)
    check_known("regularizer_triggers entry", config.regularizer_triggers, known)
    check_known("curve_class dataset", config.curve_class, DATASETS)
    problems = {
        "config.datasets is empty": not config.datasets,
        "config.models is empty": not config.models,
        f"seeds={config.seeds}: need at least 1": config.seeds < 1,
        "one_to_one_offset must not be a multiple of the class count (0)": int(
            config.one_to_one_offset
        )
        == 0,
        "config.regularizers needs a 'none' entry": "none" not in config.regularizers,
        **{
            f"no curve_class for dataset {d!r}": d not in config.curve_class
            for d in config.datasets
        },
        **{
            f"alpha {a} is not in [0, 1]": not 0.0 <= float(a) <= 1.0
            for a in [*config.triggers.values(), *config.alphas]
        },
        **{
            f"poison rate {r} is not in [0, 1]": not 0.0 <= float(r) <= 1.0
            for r in [config.rate, *config.rates]
        },
        f"poison rate {config.rate} must be above 0": not float(config.rate) > 0,
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


def sources_of(cell: Cell, num_classes: int, config):
    if cell.strategy == "many_to_one":
        return None
    return [one_to_one_source(cell.poison_class, num_classes, config.one_to_one_offset)]


def cell_poisons(images, labels, cell, seed, fns, config, split_seed, num_classes):
    """One run's poisons in one split: its plan (Eq. 8-9) and the triggered,
    blended source images (Eq. 7). The trigger's key is fixed by the cell, the seed
    and the split (not by list position), so a run's poisons are the same
    wherever they are recomputed."""
    # Made eagerly on the host (jitted, the blend could round differently) and
    # stored in the specs: a chunk is fully determined.
    if cell is None:  # the clean victim
        empty = np.zeros(0, np.int32)
        return backdoor.PoisonPlan(empty, empty, empty), images[:0].astype(np.float32)
    plan_seed = [
        int(config.seed),
        split_seed,
        seed,
        STRATEGIES.index(cell.strategy),
        cell.poison_class,
    ]
    plan = backdoor.poison_rate_plan(
        labels,
        cell.poison_class,
        cell.rate,
        np.random.default_rng(plan_seed).integers(2**31),
        sources_of(cell, num_classes, config),
    )
    key = named_key(cell, seed, split_seed)
    poisons = backdoor.apply_trigger_to_rows(
        images, plan.source_rows, fns[cell.trigger], cell.alpha, key
    )
    return plan, np.asarray(poisons)


def poison_specs(images, labels, runs, fns, config, split_seed, num_classes) -> dict:
    """Every run's poisons of one split as `TrainData` poison fields, padded with
    unused (-1) slots to the run with most (at least one slot), and the number of
    poisons per source class."""
    made = [
        cell_poisons(images, labels, c, s, fns, config, split_seed, num_classes)
        for c, s in runs
    ]
    plans = [backdoor.pad_plan(p, max(1, len(p.poison_indices))) for p, _ in made]
    stacked = backdoor.stack_plans(plans)
    padded = np.zeros((*stacked.poison_indices.shape, *images.shape[1:]), np.float32)
    for i, (_, p) in enumerate(made):
        padded[i, : len(p)] = p
    counts = np.stack(
        [np.bincount(labels[p.source_rows], minlength=num_classes) for p, _ in made]
    ).astype(np.int32)
    fields = dict(zip(POISON_FIELDS, (padded, *stacked[1:]), strict=True))
    return {**fields, "source_counts": counts}


class TriggeredSets:
    """The triggered adversarial test sets of a dataset, made once each.

    A set depends on (trigger, alpha, seed) only, so every run of a trigger at
    one alpha and seed, and the clean victim, are tested on the same images;
    identical sets (deterministic triggers across seeds) are stored once.
    """

    def __init__(self, adversarial_images, fns):
        self.images, self.fns = adversarial_images, fns
        self.sets: list[np.ndarray] = []
        self.index: dict[tuple, int] = {}
        self.by_content: dict[str, int] = {}

    def __call__(self, trigger: str, alpha: float, seed: int) -> int:
        """Index of the set of (trigger, alpha, seed), made if new."""
        name = (trigger, float(alpha), int(seed))
        if name not in self.index:
            rows = np.arange(len(self.images), dtype=np.int32)
            made = np.asarray(
                backdoor.apply_trigger_to_rows(
                    self.images,
                    rows,
                    self.fns[trigger],
                    float(alpha),
                    named_key(*name, "adversarial"),
                )
            )
            digest = hashlib.sha256(made.tobytes()).hexdigest()
            if digest not in self.by_content:
                self.by_content[digest] = len(self.sets)
                self.sets.append(made)
            self.index[name] = self.by_content[digest]
        return self.index[name]

    def stacked(self) -> jax.Array:
        return jnp.asarray(np.stack(self.sets))


def run_seeds(config, seeds) -> dict[str, np.ndarray]:
    # 1000 * seed + s and 2000 * seed + s + 1, as before the sweep engine: a
    # seed's victims (poisoned and clean) share their keys across cells.
    victim = trial_seeds(config.seed, config.seeds, stride=1000)
    finetune = trial_seeds(config.seed, config.seeds, stride=2000, offset=1)
    return {
        "seed": seeds.astype(np.int32),
        "victim_seed": victim[seeds],
        "finetune_seed": finetune[seeds],
    }


def run_specs(runs, cells, part, fns, tsets, config, num_classes) -> dict:
    """The trial specs of runs `(cell, seed)`, cell None for the clean victim:
    the cell (-1: clean), seeds, the poisons of the poison-set train and val
    splits, and the triggered test sets each victim faces (one per trigger: a
    poisoned run's own set repeated, the clean victim every trigger's at its
    alpha; one shape for both, so they share a sweep and its program)."""
    seeds = np.array([s for _, s in runs])
    val = poison_specs(*part["poison_val"], runs, fns, config, 2, num_classes)
    train = poison_specs(*part["poison_train"], runs, fns, config, 1, num_classes)
    k = len(config.triggers)
    triggered = [
        [tsets(c.trigger, c.alpha, s)] * k
        if c is not None
        else [tsets(name, a, s) for name, a in config.triggers.items()]
        for c, s in runs
    ]
    return {
        "cell": np.array(
            [-1 if c is None else cells.index(c) for c, _ in runs], np.int32
        ),
        **run_seeds(config, seeds),
        **{k: train[k] for k in (*POISON_FIELDS, "source_counts")},
        **{f"val_{k}": val[k] for k in POISON_FIELDS},
        "triggered": np.array(triggered, np.int32),
    }


def with_poisons(data, spec, prefix=""):
    """`data` with a chunk's per-run poisons (spec fields `prefix + poison_*`)."""
    return data._replace(**{k: spec[prefix + k] for k in POISON_FIELDS})


def grid_runs(model, victim, finetune, config, shared, spec) -> dict:
    """A chunk of runs (Truong et al. Sec. 3-4): each victim trained with early
    stopping on its poisoned poison-set, then trained a fixed number of epochs on
    the clean-set (the defence); both evaluated. Trials run under `lax.map` on
    CPU (`trials`)."""
    init, train, val, clean_train, clean_val, adversarial, triggered = shared
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
    tuned, _ = train_vmapped(
        model,
        trained,
        clean_train,
        trial_keys(spec["finetune_seed"]),
        finetune,
        variables_axis=0,
        trials=config.trials,
    )

    def evaluate(victims):
        def one(args):
            variables, sets, poisons = args
            return backdoor_metrics(
                model,
                variables,
                triggered[sets],
                adversarial,
                poisoned_val._replace(**poisons),
                (clean_val.images, clean_val.labels),
            )

        poisons = {k: spec[f"val_{k}"] for k in POISON_FIELDS}
        return jax.lax.map(one, (victims, spec["triggered"], poisons))

    stopping = ("epochs_run", "best_epoch", "best_val_accuracy")
    return {
        "before": {k: before[k] for k in stopping},
        "metrics_before": evaluate(trained),
        "metrics_after": evaluate(tuned),
    }


def common_row(dataset, model, num_classes, config, spec, out) -> dict:
    row = {
        "dataset": dataset,
        "model": model,
        "seed": int(spec["seed"]),
        "num_classes": num_classes,
        "epochs_run": int(out["before"]["epochs_run"]),
        "best_epoch": int(out["before"]["best_epoch"]),
        "best_val_accuracy": float(out["before"]["best_val_accuracy"]),
        "finetune_epochs": int(config.finetune.epochs),
    }
    for when in WHEN:
        for k in METRICS:
            row[f"{k}_{when}"] = float(out[f"metrics_{when}"][k])
    return row


def poisoned_row(dataset, model, cells, config, part, spec, out) -> dict:
    """A poisoned run's row: its cell and seed, the poisons, early stopping, the
    ASR (with its image counts) and accuracies before and after fine-tuning."""
    labels = part["poison_train"][1]
    num_classes = len(spec["source_counts"])
    cell = cells[int(spec["cell"])]
    n = int(np.sum(spec["poison_indices"] >= 0))
    row = {
        **common_row(dataset, model, num_classes, config, spec, out),
        "kind": "poisoned",
        **dataclasses.asdict(cell),
        "n_poisons": n,
        "source_counts": [int(c) for c in spec["source_counts"]],
        "poison_class_train_size": int(np.sum(labels == cell.poison_class)),
        "effective_rate": n / len(labels),
    }
    src = sources_of(cell, num_classes, config)
    for when in WHEN:
        conf = out[f"metrics_{when}"]["triggered_confusion"][0]
        hits, total = asr_counts(conf, cell.poison_class, src and src[0])
        row[f"asr_{when}"] = hits / max(total, 1)
        row[f"asr_hits_{when}"] = hits
        row["asr_n"] = total
    return row


def grid_row(dataset, model, cells, config, part, spec, out) -> dict:
    """A run's row: the clean victim's (cell -1) or a poisoned run's."""
    if int(spec["cell"]) < 0:
        num_classes = len(spec["source_counts"])
        return clean_row(dataset, model, num_classes, config, spec, out)
    return poisoned_row(dataset, model, cells, config, part, spec, out)


def clean_row(dataset, model, num_classes, config, spec, out) -> dict:
    """A clean victim's row: accuracies and, per trigger, the confusion counts of
    its triggered test (the ASR baseline for every poison class)."""
    row = {
        **common_row(dataset, model, num_classes, config, spec, out),
        "kind": "clean",
    }
    for when in WHEN:
        conf = out[f"metrics_{when}"]["triggered_confusion"]
        row[f"confusion_{when}"] = {
            k: np.asarray(c).tolist()
            for k, c in zip(config.triggers, conf, strict=True)
        }
    return row


def prepare(name: str, config):
    """A dataset's images, split, trigger functions and class count."""
    images, labels, class_names = load_images(name, config)
    num_classes = len(class_names)
    classes = [int(c) for c in config.poison_classes]
    curve = int(config.curve_class[name])
    if any(not 0 <= c < num_classes for c in [*classes, curve]):
        raise UserInputError(
            f"poison_classes / curve_class out of range for {name} "
            f"({num_classes} classes)"
        )
    keep = random_subset(len(labels), int(config.examples), int(config.seed))
    images, labels = images[keep], labels[keep]
    split = backdoor_protocol_split(
        labels, config.split, config.inner_split, None, int(config.seed)
    )
    part = {k: (images[v], labels[v]) for k, v in split.items()}
    fns = trigger_functions(config, part["poison_train"][0], part["held_out"][0][0])
    return part, fns, num_classes, len(labels)


def run_dataset(name: str, config, finetune, regs, workdir: str) -> list[dict]:
    """Every run of one dataset: per architecture, one resumable sweep per
    regulariser (the clean victims lead the sweep without one)."""
    part, fns, num_classes, size = prepare(name, config)
    cells = grid_cells(config, name, num_classes)
    runs = [(c, s) for c in cells for s in range(int(config.seeds))]
    adv_x, adv_y = part["adversarial"]
    print(
        f"{name}: {size} images; poison-set train/val "
        f"{len(part['poison_train'][1])}/{len(part['poison_val'][1])}, clean-set "
        f"train/val {len(part['clean_train'][1])}/{len(part['clean_val'][1])}, "
        f"adversarial test {len(adv_y)}; {len(cells)} cells x {config.seeds} seeds "
        f"= {len(runs)} poisoned runs + {config.seeds} clean victims per model"
    )
    tsets = TriggeredSets(adv_x, fns)
    specs = {}
    for reg in regs:
        group = [(c, s) for c, s in runs if c.regularizer == reg]
        if reg == "none":  # the clean victims first, in the sweep of no regulariser
            group = [(None, s) for s in range(int(config.seeds))] + group
        if group:
            specs[reg] = run_specs(group, cells, part, fns, tsets, config, num_classes)
    data = tuple(make_train_data(*part[k]) for k in CLEAN_SPLITS)
    adversarial = (jnp.asarray(adv_x, jnp.float32) / 255.0, jnp.asarray(adv_y))
    rows = []
    for model_name in config.models:
        key = jax.random.key(config.seed)
        model, init = initial_model(
            model_name,
            num_classes,
            key,
            config.init,
            cifar10_weights(model_name, config.weights_dir),
        )
        shared = (init, *data, adversarial, tsets.stacked())
        row = functools.partial(grid_row, name, model_name, cells, config, part)
        for reg, spec in specs.items():
            trial = Trial(
                functools.partial(grid_runs, model, regs[reg], finetune, config), row
            )
            rows += run_trials(
                trial,
                shared,
                spec,
                chunk_size=int(config.chunk_size),
                workdir=os.path.join(workdir, name, model_name, reg),
                mesh=trial_mesh(),
                desc=f"{name} {model_name} {reg}",
            )
    return rows


def _rates(entries) -> list[dict]:
    """`mean_ci` entries as `plots.draw_rates` rates (no interval: none drawn)."""
    out = []
    for e in entries:
        r = {"rate": e["mean"]}
        if e.get("ci95_low") is not None:
            r.update(ci95_low=max(e["ci95_low"], 0.0), ci95_high=e["ci95_high"])
        out.append(r)
    return out


def plot_curves(tab: dict, which: str, xlabel: str, path: str) -> None:
    """ASR (%) along alpha or lambda per trigger at the curve class, retrained no
    (line) / yes (dotted); a panel per dataset/model with a curve of two points or
    more, no file without one."""
    shown = {
        k: {n: c for n, c in t[which].items() if len(c) >= 2} for k, t in tab.items()
    }
    shown = {k: curves for k, curves in shown.items() if curves}
    if not shown:
        return
    fig, axes = panels(len(shown), size=(5.0, 3.6))
    for ax, (key, curves) in zip(axes, shown.items(), strict=True):
        for i, (name, curve) in enumerate(curves.items()):
            xs = sorted(curve)
            for when, style in (("before", "-"), ("after", ":")):
                rates = _rates([curve[x][when]["asr"] for x in xs])
                retrained = "no" if when == "before" else "yes"
                draw_rates(
                    ax,
                    xs,
                    rates,
                    label=f"{name} (retrained {retrained})",
                    color=f"C{i % 10}",
                    linestyle=style,
                )
        label(ax, key, xlabel, "attack success rate (%)", legend_size=6)
    save_figure(fig, path)


def plot_regularizers(tab: dict, path: str) -> None:
    """ASR and clean accuracy (%) per poison class, a line per regulariser (not
    retrained); two panels per dataset/model and trigger."""
    shown = [
        (
            key,
            name,
            {
                reg: per[name]["per_class"]
                for reg, per in t["regularizers"].items()
                if name in per
            },
        )
        for key, t in tab.items()
        for name in dict.fromkeys(n for per in t["regularizers"].values() for n in per)
    ]
    shown = [s for s in shown if len(s[2]) >= 2]
    if not shown:
        return
    fig, axes = panels(2 * len(shown), ncols=2, size=(5.0, 3.4))
    for i, (key, name, per_reg) in enumerate(shown):
        for j, (metric, title) in enumerate((("asr", "ASR"), ("accuracy", "accuracy"))):
            ax = axes[2 * i + j]
            for r, (reg, per_class) in enumerate(per_reg.items()):
                xs = sorted(per_class)
                rates = _rates([per_class[c]["before"][metric] for c in xs])
                draw_rates(
                    ax,
                    np.asarray(xs) + 0.1 * r,  # side by side per class
                    rates,
                    label=reg,
                    color=f"C{r}",
                    linestyle="none",  # classes are categories: no lines
                )
            ax.set_xticks(sorted({c for per in per_reg.values() for c in per}))
            label(ax, f"{key} {name}: {title}", "poison class", f"{title} (%)", 6)
    save_figure(fig, path)


def effect_lines(eff: dict) -> list[str]:
    """One printed line per main effect: numbers, interval, verdict."""
    lines = []
    for key, per in eff.items():
        for name, e in per.items():
            b = e["backdoor_learnt"]
            lines.append(
                f"{key} {name}: backdoor learnt: ASR (%) {pct(b['asr'])} vs clean "
                f"victim {pct(b['clean_victim_asr'])}, difference "
                f"{points(b['difference'])} points: {b['verdict']}"
            )
            for k, v in e.items():
                if k.startswith("lowered_by_"):
                    lines.append(
                        f"{key} {name}: {k.replace('_', ' ')}: difference "
                        f"{points(v['difference'])} points: {v['verdict']}"
                    )
    return lines


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the grid on every dataset; writes rows, summary, tables and figures."""
    finetune, regs = check_config(config)
    rows, seconds = [], {}
    for name in config.datasets:
        start = time.perf_counter()
        rows += run_dataset(name, config, finetune, regs, workdir)
        seconds[name] = time.perf_counter() - start
    write_jsonl(os.path.join(workdir, "results.jsonl"), rows)
    return write_outputs(rows, config, workdir, seconds)


def write_outputs(rows: list[dict], config, workdir: str, seconds=None) -> dict:
    """summary.json, tables.md and the figures of a grid's rows (also from a
    finished workdir's results.jsonl and config.json)."""
    tab = tables(rows, config)
    eff = effects(rows, config)
    summary = {
        "experiment": "backdoor_grid",
        "victim": f"{', '.join(config.models)} ({config.init}), end to end, "
        f"{config.victim.optimizer} lr {config.victim.learning_rate} batch "
        f"{config.victim.batch_size}, early stopping (patience {config.patience}, "
        f"at most {config.victim.epochs} epochs); fine-tuning "
        f"{config.finetune.epochs} epochs",
        "runs": len(rows),
        "seconds": seconds or {},  # this invocation's (resumed chunks are free)
        "tables": tab,
        "effects": eff,
    }
    write_json(os.path.join(workdir, "summary.json"), summary)
    atomic_write_text(os.path.join(workdir, "tables.md"), markdown(tab, eff))
    plot_curves(tab, "alpha_curve", "alpha (Eq. 7)", os.path.join(workdir, "alpha.png"))
    plot_curves(
        tab,
        "rate_curve",
        "poison rate lambda (Eq. 8)",
        os.path.join(workdir, "rate.png"),
    )
    plot_regularizers(tab, os.path.join(workdir, "regularizers.png"))
    for line in effect_lines(eff):
        print(line)
    return summary
