"""Poison Frogs against end-to-end fine-tuning (Shafahi et al. 2018, Sec. 4.2).

The victim starts from the pretrained network and fine-tunes EVERY layer (Adam, lr
1.85e-5, 10 epochs, batch 128) on a training set that contains the poisons. Single
poisons fail here (the lower layers move the poison's features back towards its
base), so the paper watermarks the bases with the target (opacity 0.2-0.3) and uses
many poisons from many bases; ~50 poisons reach ~60% success (Fig. 5b).

A trial = one target (a CIFAR-10 test image of the pair's target class that the
pretrained model classifies correctly; "random" ones and "outlier" ones, the
lowest-confidence correctly classified) and `max_poisons` bases, distinct training
images of the pair's base class from outside the clean subset. Per trial, one
jitted program:

1. Crafts `max_poisons` poisons with Algorithm 1 per watermark opacity (and the
   leave-one-out variants: no optimisation = the watermarked bases themselves; no
   watermark = opacity 0; a single base = one poison repeated).
2. Trains one victim per (opacity, count) and per ablation, plus a clean control:
   every victim trains on the SAME rows, the clean subset plus the trial's
   `max_poisons` base rows; a victim with n poisons has the first n base rows
   replaced by their poisons (clean label: they keep the base class) and the rest
   clean. So victims differ only in the poisons, nested in n.
3. Evaluates each victim on the target (success = classified as the base class,
   nothing else) and on a clean test subset, and keeps the penultimate features of
   the target, the poisons and class samples before and after retraining (Fig. 3).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxpoison.analysis.frogs import project, select_targets
from jaxpoison.attacks import feature_collision as fc
from jaxpoison.checks import check_known, require
from jaxpoison.data import CIFAR10_CLASSES, check_classes
from jaxpoison.errors import UserInputError
from jaxpoison.experiments.common import load_pretrained_and_data, row_pool
from jaxpoison.plots import draw_points, draw_rates, label, panels, save_figure
from jaxpoison.report import flatten
from jaxpoison.results import read_npz, write_json, write_jsonl, write_npz
from jaxpoison.summaries import group_summary, rate_text
from jaxpoison.sweep import Trial, run_trials, trial_keys, trial_seeds
from jaxpoison.sweep.sharding import trial_mesh
from jaxpoison.victims import (
    TrainConfig,
    evaluate,
    make_train_data,
    train_vmapped,
)

DATASETS = ("cifar10", "cifar10_sample")
SELECTIONS = ("random", "outlier")
# Shafahi et al. 2018, Sec. 4.2 / Fig. 5b: with opacity 0.3 and 50 poisons, about
# 60% of targets are misclassified (scaled AlexNet fine-tuned end to end on all
# 50,000 CIFAR-10 training images; read off the figure).
PUBLISHED = {"poisons": 50, "opacity": 0.3, "success_rate_about": 0.6}
WHEN = ("before", "after")  # Fig. 3: features before and after retraining
FEATURES = "features.npz"  # Fig. 3's features of a pair's first target


@dataclasses.dataclass(frozen=True)
class VictimPlan:
    """The victims of one trial, in order (static).

    `labels[v]` names victim v; `source[v]` is the crafted set its poisons come
    from (-1: none, the clean control); `count[v]` how many of them it trains with;
    `single[v]` whether it repeats poison 0 (the single-base ablation).
    """

    labels: tuple[str, ...]
    source: tuple[int, ...]
    count: tuple[int, ...]
    single: tuple[bool, ...]


def victim_plan(
    opacities: tuple[float, ...],
    counts: tuple[int, ...],
    ablation_opacity: float,
    ablation_count: int,
) -> VictimPlan:
    """Control, the (opacity, count) victims, then the leave-one-out ablations.

    Crafted sets (see `crafted_sets`): one per opacity, then, with ablations,
    "no_optimisation" (the watermarked bases) and "no_watermark" (opacity 0).
    """
    labels, source, count, single = ["control"], [-1], [0], [False]
    for i, g in enumerate(opacities):
        for n in counts:
            labels.append(f"opacity={g:g}/n={n}")
            source.append(i)
            count.append(n)
            single.append(False)
    if ablation_count:
        k = len(opacities)
        for name, src, one in (
            ("no_optimisation", k, False),
            ("no_watermark", k + 1, False),
            ("single_base", opacities.index(ablation_opacity), True),
        ):
            labels.append(f"{name}/n={ablation_count}")
            source.append(src)
            count.append(ablation_count)
            single.append(one)
    return VictimPlan(tuple(labels), tuple(source), tuple(count), tuple(single))


def crafted_sets(
    model, variables, bases, targets, opacities, craft_cfg, ablation_opacity
):
    """(S, N, H, W, C) poisons: one set per opacity (Algorithm 1 from watermarked
    bases), then, if `ablation_opacity`, the watermarked bases without optimisation
    and poisons crafted without a watermark. All sets' poisons are independent
    problems of one `craft` call each (N = targets x bases)."""
    sets = []
    for g in opacities:
        cfg = dataclasses.replace(craft_cfg, watermark=g)
        sets.append(fc.craft(model, variables, bases, targets, cfg)[0])
    if ablation_opacity:
        sets.append(fc.watermark(bases, targets, ablation_opacity))
        cfg = dataclasses.replace(craft_cfg, watermark=0.0)
        sets.append(fc.craft(model, variables, bases, targets, cfg)[0])
    return jnp.stack(sets)


def victim_poisons(sets, plan: VictimPlan, base_slots):
    """Poisons per victim for one target.

    Args:
      sets: (S, P, H, W, C) crafted sets of this target.
      base_slots: (P,) the pool rows of its bases.

    Returns:
      (V, P, H, W, C) poison images and (V, P) pool rows they replace (-1 unused):
      victim v replaces the first `plan.count[v]` base rows.
    """
    slot = jnp.arange(sets.shape[1])
    images, indices = [], []
    for src, n, one in zip(plan.source, plan.count, plan.single, strict=True):
        poisons = sets[max(src, 0)]
        if one:
            poisons = jnp.broadcast_to(poisons[:1], poisons.shape)
        images.append(poisons)
        indices.append(jnp.where(slot < n, base_slots, -1))
    return jnp.stack(images), jnp.stack(indices)


def e2e_trials(
    model,
    plan: VictimPlan,
    opacities: tuple[float, ...],
    ablation_opacity: float,
    craft_cfg: fc.FCConfig,
    victim_cfg: TrainConfig,
    shared,
    spec,
):
    """A chunk of T targets: craft, train T x V victims, evaluate. Pure (jitted).

    Args:
      shared: `pool` (TrainData of the clean subset + every trial's bases, uint8),
        `variables` (pretrained), `clean_rows` (M,) pool rows of the clean subset,
        `probe_rows` (Q,) pool rows of class samples whose features Fig. 3 plots,
        the clean test subset (`test_images` uint8, `test_labels`) and the pair's
        `base_class` ().
      spec: per target: `target_image` (T, H, W, C) in [0, 1], `base_pool_rows`
        (T, P) pool rows of its bases, `seed` (T,) its victims' seed.

    Returns:
      Per-victim arrays (T, V) and per-target features for Fig. 3.
    """
    pool_data, variables = shared["pool"], shared["variables"]
    clean_rows, base_class = shared["clean_rows"], shared["base_class"]
    targets, base_rows = spec["target_image"], spec["base_pool_rows"]
    t, p = base_rows.shape
    dtype = pool_data.poison_images.dtype
    bases = pool_data.images[base_rows].astype(dtype) / 255.0  # (T, P, H, W, C)
    flat = bases.reshape(t * p, *bases.shape[2:])
    flat_targets = jnp.repeat(targets, p, axis=0)
    has_ablation = any(lbl.startswith("no_watermark") for lbl in plan.labels)
    sets = crafted_sets(
        model,
        variables,
        flat,
        flat_targets,
        opacities,
        craft_cfg,
        ablation_opacity if has_ablation else 0.0,
    )
    sets = jnp.round(sets * 255.0) / 255.0  # a poison enters as an 8-bit image
    sets = jnp.moveaxis(sets.reshape(sets.shape[0], t, p, *sets.shape[2:]), 1, 0)
    images, indices = jax.vmap(lambda s, b: victim_poisons(s, plan, b))(sets, base_rows)
    v = len(plan.labels)
    subsets = jnp.concatenate(
        [jnp.broadcast_to(clean_rows, (t, clean_rows.shape[0])), base_rows], axis=1
    )
    data = pool_data._replace(
        poison_images=images.reshape(t * v, *images.shape[2:]),
        poison_indices=indices.reshape(t * v, p),
        poison_labels=jnp.full((t * v, p), base_class, jnp.int32),
        subset=jnp.repeat(subsets, v, axis=0),
    )
    keys = jnp.repeat(trial_keys(spec["seed"]), v)
    trained, _ = train_vmapped(model, variables, data, keys, victim_cfg)
    probes = pool_data.images[shared["probe_rows"]].astype(dtype) / 255.0
    target_of_victim = jnp.repeat(targets, v, axis=0)

    test_images, test_labels = shared["test_images"], shared["test_labels"]

    def assess(args):
        vars_, target = args
        logits, target_feats = model.apply(vars_, target[None])
        accuracy = evaluate(model, vars_, test_images, test_labels)["accuracy"]
        return jax.nn.softmax(logits[0]), accuracy

    probs, accuracy = jax.lax.map(assess, (trained, target_of_victim))
    probs = probs.reshape(t, v, -1)

    # Fig. 3: features before (pretrained) and after retraining, under the victim
    # with the most poisons of the first opacity.
    show = plan.labels.index(f"opacity={opacities[0]:g}/n={max(plan.count)}")

    def features(vars_, target, poisons):
        return (
            model.apply(vars_, target[None])[1][0],
            model.apply(vars_, poisons)[1],
            model.apply(vars_, probes)[1],
        )

    shown = jax.tree.map(lambda x: x.reshape(t, v, *x.shape[1:])[:, show], trained)
    before = jax.vmap(lambda tg, ps: features(variables, tg, ps))(targets, sets[:, 0])
    after = jax.vmap(features)(shown, targets, sets[:, 0])
    return {
        "prediction": jnp.argmax(probs, -1),
        "base_class_prob": probs[..., base_class],
        "test_accuracy": accuracy.reshape(t, v),
        "feature_distance": jnp.linalg.norm(before[1] - before[0][:, None], axis=-1),
        "perturbation_linf": jnp.abs(sets[:, 0] - bases).max(axis=(2, 3, 4)),
        "features_before": before,
        "features_after": after,
    }


def check_config(config):
    """Validates everything that needs no data; returns the parsed pieces."""
    check_known("dataset", config.dataset, DATASETS)
    check_known("target selection", config.targets, SELECTIONS)
    craft_cfg = fc.FCConfig(**config.craft)
    victim_cfg = TrainConfig.from_mapping(config.victim)
    require(
        victim_cfg.mode == "end_to_end",
        "frogs_e2e fine-tunes every layer: victim.mode end_to_end",
    )
    pairs = {k: tuple(int(c) for c in v) for k, v in config.pairs.items()}
    for name, pair in pairs.items():
        check_classes(pair, len(CIFAR10_CLASSES), f"pair {name}: class")
        require(
            len(pair) == 2 and pair[0] != pair[1],
            f"pair {name}: (target class, base class), got {pair}",
        )
    opacities = tuple(float(g) for g in config.opacities)
    counts = tuple(sorted(int(n) for n in config.poison_counts))
    require(
        opacities and counts and min(counts) >= 1,
        "opacities and poison_counts (each >= 1) are needed",
    )
    require(min(config.targets.values(), default=0) >= 0, "targets: each n >= 0")
    require(
        not config.ablation_count or config.ablation_opacity in opacities,
        f"ablation_opacity {config.ablation_opacity} is not one of {opacities}",
    )
    require(
        config.ablation_count <= counts[-1],
        f"ablation_count {config.ablation_count} > max poisons {counts[-1]}",
    )
    return craft_cfg, victim_cfg, pairs, opacities, counts


def pair_specs(pair, config, train, test, test_probs, max_p):
    """A pair's trials (targets, their bases, seeds) and its clean test rows."""
    target_class, base_class = pair
    rng = np.random.default_rng(config.seed)
    spare_bases = np.flatnonzero(train.labels == base_class)[config.per_class :]
    eval_rows = np.sort(
        np.concatenate(
            [
                np.flatnonzero(test.labels == c)[: config.test_per_class]
                for c in range(len(CIFAR10_CLASSES))
            ]
        )
    )
    candidates = np.setdiff1d(np.arange(len(test.labels)), eval_rows)
    target_rows, selection = [], []
    for sel in SELECTIONS:
        n = int(config.targets.get(sel, 0))
        rows = select_targets(
            test_probs, test.labels, candidates, target_class, n, sel, rng
        )
        target_rows.extend(rows)
        selection.extend([sel] * n)
    if len(spare_bases) < max_p:
        raise UserInputError(
            f"{max_p} poisons need {max_p} base images outside the clean subset; "
            f"class {base_class} has {len(spare_bases)}"
        )
    specs = {
        "target_row": np.asarray(target_rows, np.int32),
        "outlier": np.asarray([s == "outlier" for s in selection]),
        "base_rows": np.stack(
            [rng.choice(spare_bases, max_p, replace=False) for _ in target_rows]
        ).astype(np.int32),
        "seed": trial_seeds(config.seed, len(target_rows)),
        # Scaled on the host (numpy) as before the trial engine, so results stay
        # bit-identical: XLA's float32 division rounds some pixels differently.
        "target_image": test.images[target_rows].astype(np.float32) / 255.0,
    }
    return specs, eval_rows


def run_pair(name, pair, config, pieces, data, workdir) -> tuple[list[dict], dict]:
    """One (target class, base class) pair's sweep in `workdir/name`; returns its
    rows and the Fig. 3 features of its first target."""
    craft_cfg, victim_cfg, opacities, counts, plan = pieces
    train, test, test_probs, model, variables = data
    target_class, base_class = pair
    specs, eval_rows = pair_specs(pair, config, train, test, test_probs, counts[-1])
    clean = {
        c: np.flatnonzero(train.labels == c)[: config.per_class]
        for c in range(len(CIFAR10_CLASSES))
    }
    clean_rows = np.concatenate(list(clean.values()))
    pool = row_pool(len(train.labels), clean_rows, specs["base_rows"])
    specs["base_pool_rows"] = pool.at(specs["base_rows"])
    probe_rows = np.concatenate(
        [clean[target_class][: config.probes], clean[base_class][: config.probes]]
    )
    shared = {
        "pool": make_train_data(train.images[pool.rows], train.labels[pool.rows]),
        "variables": variables,
        "clean_rows": np.sort(pool.at(clean_rows)),
        "probe_rows": pool.at(probe_rows),
        "test_images": test.images[eval_rows],
        "test_labels": test.labels[eval_rows],
        "base_class": np.int32(base_class),
    }
    print(
        f"pair {name} (target {CIFAR10_CLASSES[target_class]}, base "
        f"{CIFAR10_CLASSES[base_class]}): {len(specs['seed'])} targets x "
        f"{len(plan.labels)} victims on {len(clean_rows) + counts[-1]} training images"
    )
    trial = Trial(
        run=functools.partial(
            e2e_trials,
            model,
            plan,
            opacities,
            float(config.ablation_opacity),
            craft_cfg,
            victim_cfg,
        ),
        row=functools.partial(
            target_row, name, pair, plan, test.example_ids, test_probs[:, target_class]
        ),
        save=save_first_features,
    )
    sweep = os.path.join(workdir, name)
    rows = run_trials(
        trial,
        shared,
        specs,
        chunk_size=config.chunk_size,
        workdir=sweep,
        mesh=trial_mesh(),  # each device crafts and trains for its own targets
        desc=f"{name} targets",
    )
    saved = read_npz(os.path.join(sweep, FEATURES))
    figure = {w: tuple(saved[f"{w}_{i}"] for i in range(3)) for w in WHEN}
    return rows, figure


def target_row(pair_name, pair, plan, test_ids, confidence, spec, out) -> dict:
    """A target's row; its victims' results nest in it, in `plan` order."""
    target_class, base_class = pair
    victims = [
        {
            "victim": label,
            "n_poisons": plan.count[j],
            "prediction": int(out["prediction"][j]),
            "success": int(out["prediction"][j]) == base_class,
            "base_class_prob": float(out["base_class_prob"][j]),
            "test_accuracy": float(out["test_accuracy"][j]),
        }
        for j, label in enumerate(plan.labels)
    ]
    row = int(spec["target_row"])
    return {
        "pair": pair_name,
        "target_test_index": int(test_ids[row]),
        "target_class": target_class,
        "base_class": base_class,
        "outlier": bool(spec["outlier"]),
        "seed": int(spec["seed"]),
        "target_confidence": float(confidence[row]),
        "mean_feature_distance": float(out["feature_distance"].mean()),
        "max_perturbation_linf": float(out["perturbation_linf"].max()),
        "victims": victims,
    }


def save_first_features(index, spec, out, workdir) -> None:
    """Fig. 3's features (the pair's first target) with the first chunk, so a
    resumed run draws the figure without recomputing them."""
    del spec
    if index:
        return
    arrays = {
        f"{w}_{i}": x[0] for w in WHEN for i, x in enumerate(out[f"features_{w}"])
    }
    write_npz(os.path.join(workdir, FEATURES), arrays)


def victim_rows(rows: list[dict]) -> list[dict]:
    """One row per victim (`report.flatten`), with the selection that drew its
    target."""
    return [
        {**r, "selection": "outlier" if r["outlier"] else "random"}
        for r in flatten(rows)
    ]


def summarise(rows: list[dict]) -> dict:
    """Success per (pair, target selection, victim) with Wilson intervals, the
    victims' mean test accuracy and median base-class probability; `all`
    selections together too."""
    flat = victim_rows(rows)
    stats = {"means": ["test_accuracy"], "medians": ["base_class_prob"]}
    return {
        **group_summary(flat, ["pair", "selection", "victim"], **stats),
        **group_summary(flat, ["pair", "victim"], **stats),
    }


def plot_success(settings: dict, pairs, opacities, counts, path: str) -> None:
    """Fig. 5b: success (Wilson intervals) against the number of poisons, a panel
    per pair, a line per (target selection, opacity); `settings` from `summarise`."""
    fig, axes = panels(len(pairs))
    for ax, pair in zip(axes, pairs, strict=True):
        for sel, style in zip(SELECTIONS, ("-", "--"), strict=True):
            for g in opacities:
                group = f"pair={pair},selection={sel},victim=opacity={g:g}/n="
                if f"{group}{counts[0]}" in settings:
                    rates = [settings[f"{group}{n}"] for n in counts]
                    line = f"{sel}, opacity {g:g}"
                    draw_rates(ax, counts, rates, line, linestyle=style)
        ax.set_ylim(-5, 105)
        ylabel = "targets misclassified as the base class (%)"
        label(ax, pair, "number of poisons", ylabel)
    save_figure(fig, path)


def plot_projection(figures: dict, n_probes: int, path: str) -> None:
    """Fig. 3: target, poisons and class samples before and after retraining, in
    the plane of `analysis.frogs.project`."""
    styles = {
        "target_class": dict(label="target class", s=8, c="tab:blue", alpha=0.5),
        "base_class": dict(label="base class", s=8, c="tab:orange", alpha=0.5),
        "poisons": dict(s=18, marker="^", c="tab:red"),
        "target": dict(s=120, marker="*", c="k"),
    }
    fig, axes = panels(2 * len(figures), ncols=2, size=(4.5, 3.6))
    views = [(pair, when) for pair in figures for when in WHEN]
    for ax, (pair, when) in zip(axes, views, strict=True):
        draw_points(ax, project(figures[pair][when], n_probes), styles)
        label(
            ax,
            f"{pair}: {when} retraining",
            "target-class centroid (0) -> base-class centroid (1)",
            "largest other direction of the class samples",
        )
    save_figure(fig, path)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs every pair; writes results.jsonl, summary.json and two PNG figures."""
    craft_cfg, victim_cfg, pairs, opacities, counts = check_config(config)
    plan = victim_plan(
        opacities, counts, float(config.ablation_opacity), int(config.ablation_count)
    )
    model, variables, train, test, _, test_probs = load_pretrained_and_data(config)
    data = (train, test, test_probs, model, variables)
    pieces = (craft_cfg, victim_cfg, opacities, counts, plan)
    rows, figures = [], {}
    for name, pair in pairs.items():
        trials, figures[name] = run_pair(name, pair, config, pieces, data, workdir)
        rows.extend(trials)
    write_jsonl(os.path.join(workdir, "results.jsonl"), rows)
    summary = summarise(rows)
    if rows:
        png = os.path.join(workdir, "success.png")
        plot_success(summary, list(pairs), opacities, counts, png)
        plot_projection(figures, config.probes, os.path.join(workdir, "features.png"))
    result = {
        "experiment": "frogs_e2e",
        "model": f"{config.model} pretrained on CIFAR-10, fine-tuned end to end",
        "training_images": 10 * config.per_class + counts[-1],
        "victims": list(plan.labels),
        "settings": summary,
        "published": PUBLISHED,
    }
    write_json(os.path.join(workdir, "summary.json"), result)
    for key, s in summary.items():
        accuracy = 100 * s["mean_test_accuracy"]
        print(f"{key}: success {rate_text(s)}, test accuracy {accuracy:.2f}%")
    return result
