"""Poison Frogs against end-to-end fine-tuning (Shafahi et al. 2018, Sec. 4.2).

The victim starts from the pretrained network and fine-tunes EVERY layer (Adam, lr
1.85e-5, 10 epochs, batch 128) on the clean training set plus the poisons. Single
poisons fail here (the lower layers move the poison's features back towards its
base), so the paper watermarks the bases with the target (opacity 0.2-0.3) and uses
many poisons from many bases; ~50 poisons reach ~60% success (Fig. 5b).

A trial = one target (a CIFAR-10 test image of the pair's target class that the
pretrained model classifies correctly; "random" ones and "outlier" ones, the
lowest-confidence correctly classified) and `max_poisons` bases, distinct TEST
images of the pair's base class (as the paper: targets and bases both from the test
set), none of them in the clean test subset that measures accuracy. Per trial, one
jitted program:

1. Crafts `max_poisons` poisons with Algorithm 1 per watermark opacity (and the
   leave-one-out variants: no optimisation = the watermarked bases themselves; no
   watermark = opacity 0; a single base = one poison repeated).
2. Trains one victim per (opacity, count) and per ablation, plus a clean control. A
   victim with n poisons trains on the clean training set plus EXACTLY its n poisons
   (clean label: the base class), nothing else: `train_size` = clean + n. The
   poisons are the first n of the trial's crafted set, so counts are nested. Victims
   with the same n share one trainer (one training-set size); each n has its own.
3. Evaluates each victim on the target (success = classified as the base class,
   nothing else) and on a clean test subset, and keeps the penultimate features of
   the target, the poisons and class samples, and the last layer's weight vector,
   before and after retraining (Fig. 3).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxpoison.analysis.frogs import class_row, head_kernel, project, select_targets
from jaxpoison.attacks import feature_collision as fc
from jaxpoison.checks import check_known, require
from jaxpoison.data import CIFAR10_CLASSES, check_classes
from jaxpoison.errors import UserInputError
from jaxpoison.experiments.common import load_pretrained_and_data
from jaxpoison.models import head_variables
from jaxpoison.plots import draw_points, draw_rates, label, panels, save_figure
from jaxpoison.report import flatten
from jaxpoison.results import (
    rate_summary,
    read_jsonl,
    read_npz,
    write_json,
    write_jsonl,
    write_npz,
)
from jaxpoison.summaries import fisher_exact_p, group_summary, mcnemar_p, rate_text
from jaxpoison.sweep import Trial, run_trials, trial_keys, trial_seeds
from jaxpoison.sweep.sharding import trial_mesh
from jaxpoison.victims import (
    TrainConfig,
    TrainData,
    evaluate,
    make_train_data,
    train_vmapped,
)

DATASETS = ("cifar10", "cifar10_sample")
SELECTIONS = ("random", "outlier")
# Shafahi et al. 2018, Sec. 4.2 / Fig. 5b (scaled AlexNet fine-tuned end to end on
# all 50,000 CIFAR-10 training images): with opacity 0.3 and 50 poisons about 60% of
# targets are misclassified (read off the figure); outlier targets: 70% at 50
# poisons against 53% for random targets (the text, as issue 15 quotes it).
PUBLISHED = {
    "poisons": 50,
    "opacity": 0.3,
    "success_rate_about": 0.6,
    "outlier_success_at_50": 0.70,
    "random_success_at_50": 0.53,
}
WHEN = ("before", "after")  # Fig. 3: features before and after retraining
FEATURES = "features.npz"  # Fig. 3's features of a pair's first target
FIGURE_PARTS = ("target", "poisons", "probes", "theta")


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


def count_groups(plan: VictimPlan) -> dict[int, tuple[int, ...]]:
    """Victims by poison count (static): each count is one training-set size."""
    groups: dict[int, list[int]] = {}
    for j, n in enumerate(plan.count):
        groups.setdefault(n, []).append(j)
    return {n: tuple(v) for n, v in sorted(groups.items())}


def group_poisons(sets, plan: VictimPlan, victims: tuple[int, ...], n: int):
    """(len(victims), n, H, W, C): the first n poisons of each victim's crafted set
    (`sets`: (S, P, H, W, C) of one target), or poison 0 repeated n times for the
    single-base ablation."""
    out = []
    for j in victims:
        poisons = sets[max(plan.source[j], 0), :n]
        if plan.single[j]:
            poisons = jnp.broadcast_to(poisons[:1], poisons.shape)
        out.append(poisons)
    return jnp.stack(out)


def victim_training_set(pool: TrainData, clean_size: int, poisons, base_class):
    """The training sets of victims with n = poisons.shape[1] poisons each.

    `pool` holds the clean training set in rows [0, clean_size) and spare rows
    after it; a victim trains on the clean rows plus the first n spare rows, which
    its poisons (V, n, H, W, C) replace, labelled `base_class` (clean label). So it
    sees clean_size + n images: the clean set and exactly its poisons.
    """
    v, n = poisons.shape[:2]
    rows = clean_size + jnp.arange(n, dtype=jnp.int32)
    return pool._replace(
        poison_images=poisons,
        poison_indices=jnp.broadcast_to(rows, (v, n)),
        poison_labels=jnp.full((v, n), base_class, jnp.int32),
        subset=jnp.arange(clean_size + n, dtype=jnp.int32),
    )


def pair_theta(variables, pair) -> jax.Array:
    """Fig. 3's weight vector theta: the last layer's w_base - w_target, the normal
    of the boundary between the pair's two classes (the paper's two-class theta)."""
    kernel = head_kernel(head_variables(variables))
    target_class, base_class = pair
    return class_row(kernel, jnp.int32(base_class)) - class_row(
        kernel, jnp.int32(target_class)
    )


def e2e_trials(
    model,
    plan: VictimPlan,
    pair: tuple[int, int],
    opacities: tuple[float, ...],
    ablation_opacity: float,
    clean_size: int,
    craft_cfg: fc.FCConfig,
    victim_cfg: TrainConfig,
    shared,
    spec,
):
    """A chunk of T targets: craft, train T x V victims, evaluate. Pure (jitted).

    Args:
      shared: `pool` (TrainData, uint8: the clean training set in rows [0,
        clean_size), then `max_poisons` spare rows the poisons replace),
        `variables` (pretrained), `probe_rows` (Q,) pool rows of class samples
        whose features Fig. 3 plots, the clean test subset (`test_images` uint8,
        `test_labels`).
      spec: per target: `target_image` (T, H, W, C) in [0, 1], `base_image`
        (T, P, H, W, C) uint8 test images of the base class, `seed` (T,) its
        victims' seed.

    Returns:
      Per-victim arrays (T, V) and per-target features for Fig. 3.
    """
    pool_data, variables = shared["pool"], shared["variables"]
    base_class = pair[1]
    targets = spec["target_image"]
    dtype = pool_data.poison_images.dtype
    bases = spec["base_image"].astype(dtype) / 255.0  # (T, P, H, W, C)
    t, p = bases.shape[:2]
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
    keys = trial_keys(spec["seed"])  # one per target, shared by its victims
    test_images, test_labels = shared["test_images"], shared["test_labels"]

    def assess(args):
        vars_, target = args
        logits, _ = model.apply(vars_, target[None])
        accuracy = evaluate(model, vars_, test_images, test_labels)["accuracy"]
        return jax.nn.softmax(logits[0]), accuracy

    # Fig. 3: features before (pretrained) and after retraining, under the victim
    # with the most poisons of the first opacity.
    show = plan.labels.index(f"opacity={opacities[0]:g}/n={max(plan.count)}")
    order, outputs, shown = [], [], None
    for n, victims in count_groups(plan).items():
        v = len(victims)
        poisons = jax.vmap(lambda s_, n=n, vs=victims: group_poisons(s_, plan, vs, n))(
            sets
        ).reshape(t * v, n, *sets.shape[3:])
        data = victim_training_set(pool_data, clean_size, poisons, base_class)
        trained, _ = train_vmapped(
            model, variables, data, jnp.repeat(keys, v, axis=0), victim_cfg
        )
        probs, accuracy = jax.lax.map(assess, (trained, jnp.repeat(targets, v, axis=0)))
        in_subset = jnp.isin(data.poison_indices, data.subset).sum(-1)
        outputs.append(
            {
                "probs": probs.reshape(t, v, -1),
                "test_accuracy": accuracy.reshape(t, v),
                # Audited from the data the trainer read, not from the plan.
                "train_size": jnp.full((t, v), data.subset.shape[0], jnp.int32),
                "poisons_trained": in_subset.reshape(t, v).astype(jnp.int32),
            }
        )
        order.extend(victims)
        if show in victims:  # the (T, v) victims' slot `at`, per target
            at = np.arange(t) * v + victims.index(show)
            shown = jax.tree.map(lambda x, at=at: x[at], trained)
    # Back to plan order.
    back = np.argsort(np.asarray(order))
    per_victim = {
        k: jnp.concatenate([o[k] for o in outputs], axis=1)[:, back] for k in outputs[0]
    }
    probs = per_victim.pop("probs")
    probes = pool_data.images[shared["probe_rows"]].astype(dtype) / 255.0

    def features(vars_, target, poisons):
        return (
            model.apply(vars_, target[None])[1][0],
            model.apply(vars_, poisons)[1],
            model.apply(vars_, probes)[1],
            pair_theta(vars_, pair),
        )

    before = jax.vmap(lambda tg, ps: features(variables, tg, ps))(targets, sets[:, 0])
    after = jax.vmap(features)(shown, targets, sets[:, 0])
    return {
        **per_victim,
        "prediction": jnp.argmax(probs, -1),
        "base_class_prob": probs[..., base_class],
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


def pair_specs(pair, config, test, test_probs, max_p):
    """A pair's trials (targets, their bases, seeds) and its clean test rows.

    Targets and bases are test images outside the clean test subset (the rows that
    measure accuracy); each target gets `max_p` distinct bases of the base class.
    """
    target_class, base_class = pair
    rng = np.random.default_rng(config.seed)
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
    spare_bases = candidates[test.labels[candidates] == base_class]
    if len(spare_bases) < max_p:
        raise UserInputError(
            f"{max_p} poisons need {max_p} test images of class {base_class} "
            f"outside the clean test subset; there are {len(spare_bases)}"
        )
    base_rows = np.stack(
        [np.sort(rng.choice(spare_bases, max_p, replace=False)) for _ in target_rows]
    ).reshape(len(target_rows), max_p)
    # One random column order for all targets: a victim's n poisons come from a
    # random n of its target's bases.
    rng.shuffle(base_rows, axis=1)
    specs = {
        "target_row": np.asarray(target_rows, np.int32),
        "outlier": np.asarray([s == "outlier" for s in selection]),
        "base_rows": base_rows.astype(np.int32),
        "base_image": test.images[base_rows],
        "seed": trial_seeds(config.seed, len(target_rows)),
        # Scaled on the host (numpy), as the targets always were.
        "target_image": test.images[target_rows].astype(np.float32) / 255.0,
    }
    return specs, eval_rows


def clean_pool(train, per_class: int, base_class: int, max_p: int):
    """The clean training set (the first `per_class` images of every class, in
    split order) in pool rows [0, M), then `max_p` spare rows of the base class
    that only poisons ever fill; returns (TrainData, M, split rows per class)."""
    clean = {
        c: np.flatnonzero(train.labels == c)[:per_class]
        for c in range(len(CIFAR10_CLASSES))
    }
    rows = np.sort(np.concatenate(list(clean.values())))
    spare = np.zeros((max_p, *train.images.shape[1:]), train.images.dtype)
    pool = make_train_data(
        np.concatenate([train.images[rows], spare]),
        np.concatenate([train.labels[rows], np.full(max_p, base_class)]).astype(
            np.int32
        ),
    )
    return pool, len(rows), {c: np.searchsorted(rows, r) for c, r in clean.items()}


def run_pair(name, pair, config, pieces, data, workdir) -> tuple[list[dict], dict]:
    """One (target class, base class) pair's sweep in `workdir/name`; returns its
    rows and the Fig. 3 features of its first target."""
    craft_cfg, victim_cfg, opacities, counts, plan = pieces
    train, test, test_probs, model, variables = data
    target_class, base_class = pair
    specs, eval_rows = pair_specs(pair, config, test, test_probs, counts[-1])
    pool, clean_size, clean = clean_pool(
        train, config.per_class, base_class, counts[-1]
    )
    probe_rows = np.concatenate(
        [clean[target_class][: config.probes], clean[base_class][: config.probes]]
    )
    shared = {
        "pool": pool,
        "variables": variables,
        "probe_rows": probe_rows.astype(np.int32),
        "test_images": test.images[eval_rows],
        "test_labels": test.labels[eval_rows],
    }
    print(
        f"pair {name} (target {CIFAR10_CLASSES[target_class]}, base "
        f"{CIFAR10_CLASSES[base_class]}): {len(specs['seed'])} targets x "
        f"{len(plan.labels)} victims, each on {clean_size} clean training images "
        f"+ its n poisons (n in {sorted(set(plan.count))})"
    )
    trial = Trial(
        run=functools.partial(
            e2e_trials,
            model,
            plan,
            pair,
            opacities,
            float(config.ablation_opacity),
            clean_size,
            craft_cfg,
            victim_cfg,
        ),
        row=functools.partial(
            target_row,
            name,
            pair,
            plan,
            clean_size,
            test.example_ids,
            test_probs[:, target_class],
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
    figure = {
        w: tuple(saved[f"{w}_{i}"] for i in range(len(FIGURE_PARTS))) for w in WHEN
    }
    return rows, figure


def target_row(
    pair_name, pair, plan, clean_size, test_ids, confidence, spec, out
) -> dict:
    """A target's row; its victims' results nest in it, in `plan` order. Each
    victim carries `n_poisons` (the plan's) and, read back from the data it
    trained on, `train_size` and `poisons_trained` (its poisoned rows)."""
    target_class, base_class = pair
    victims = [
        {
            "victim": label,
            "n_poisons": plan.count[j],
            "train_size": int(out["train_size"][j]),
            "poisons_trained": int(out["poisons_trained"][j]),
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
        "clean_train_size": clean_size,
        "base_test_indices": [int(test_ids[b]) for b in spec["base_rows"]],
        "mean_feature_distance": float(out["feature_distance"].mean()),
        "max_perturbation_linf": float(out["perturbation_linf"].max()),
        "victims": victims,
    }


def save_first_features(index, spec, out, workdir) -> None:
    """Fig. 3's features and theta (the pair's first target) with the first chunk,
    so a resumed run draws the figure without recomputing them."""
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
    selections together, and both pairs together, too."""
    flat = victim_rows(rows)
    stats = {"means": ["test_accuracy"], "medians": ["base_class_prob"]}
    return {
        **group_summary(flat, ["pair", "selection", "victim"], **stats),
        **group_summary(flat, ["pair", "victim"], **stats),
        **group_summary(flat, ["selection", "victim"], **stats),
    }


def paired_effect(flat: list[dict], high: str, low: str, key=("pair", "seed")):
    """Success of victim `high` against victim `low` on the same targets: both
    rates (Wilson), the targets where only `high` / only `low` succeeds, and the
    exact McNemar p of that difference."""
    by_target: dict[tuple, dict[str, bool]] = {}
    for r in flat:
        if r["victim"] in (high, low):
            by_target.setdefault(tuple(r[k] for k in key), {})[r["victim"]] = r[
                "success"
            ]
    pairs = [v for v in by_target.values() if len(v) == 2]
    more = sum(v[high] and not v[low] for v in pairs)
    fewer = sum(v[low] and not v[high] for v in pairs)
    return {
        "high": high,
        "low": low,
        high: rate_summary(v[high] for v in pairs),
        low: rate_summary(v[low] for v in pairs),
        "only_high": more,
        "only_low": fewer,
        "mcnemar_p": mcnemar_p(more, fewer),
    }


def effects(rows: list[dict], opacities, counts) -> dict:
    """The paper's effects, both pairs together (random targets unless named):

    * `poisons/opacity=g`: the most poisons against the fewest, same targets;
    * `opacity/n=N`: the highest opacity against the lowest at the most poisons;
    * `outliers`: outlier against random targets at the most poisons (unpaired
      rates and Fisher's exact p; the paper: 70% vs 53% at 50 poisons).
    """
    flat = victim_rows(rows)
    random = [r for r in flat if r["selection"] == "random"]
    out = {}
    for g in opacities if random and len(counts) > 1 else ():
        out[f"poisons/opacity={g:g}"] = paired_effect(
            random, f"opacity={g:g}/n={counts[-1]}", f"opacity={g:g}/n={counts[0]}"
        )
    if random and len(opacities) > 1:
        hi, lo = max(opacities), min(opacities)
        out[f"opacity/n={counts[-1]}"] = paired_effect(
            random, f"opacity={hi:g}/n={counts[-1]}", f"opacity={lo:g}/n={counts[-1]}"
        )
    victim = f"opacity={max(opacities):g}/n={counts[-1]}"
    chosen = {
        sel: [
            r["success"] for r in flat if (r["selection"], r["victim"]) == (sel, victim)
        ]
        for sel in SELECTIONS
    }
    out["outliers"] = {
        "victim": victim,
        **{sel: rate_summary(f) for sel, f in chosen.items() if f},
    }
    if all(chosen.values()):  # both selections ran: Fisher's exact test
        hits = [(sum(chosen[sel]), len(chosen[sel])) for sel in SELECTIONS]
        out["outliers"]["fisher_p"] = fisher_exact_p(*hits[1], *hits[0])
    return out


# What runs to be pooled must share: everything but their targets, seed and cells.
POOLED_PROTOCOL = (
    "model", "weights", "dataset", "pairs", "per_class", "test_per_class", "craft",
    "victim",
)  # fmt: skip


def pooled_rows(workdirs: list[str]) -> list[dict]:
    """The target rows of several finished runs of one protocol (e.g. more random
    targets under another seed, or outlier targets), for `effects` and `summarise`.

    Runs may differ in their targets, seed and victim cells; `POOLED_PROTOCOL` must
    match. Within a selection no target may appear twice, and no (pair, trial
    seed) either, since paired effects match victims by (pair, seed); a target may
    be both a random and an outlier one, as within one run.
    """
    rows, protocol, seen = [], None, set()
    for workdir in workdirs:
        paths = [os.path.join(workdir, f) for f in ("config.json", "results.jsonl")]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise UserInputError(f"{missing[0]} not found: not a finished run")
        with open(paths[0]) as f:
            config = json.load(f)
        this = {k: config.get(k) for k in POOLED_PROTOCOL}
        protocol = protocol or this
        differs = [k for k in POOLED_PROTOCOL if this[k] != protocol[k]]
        if differs:
            raise UserInputError(
                f"{workdir}: its {differs[0]} differs from {workdirs[0]}'s; "
                "only runs of one protocol pool"
            )
        for row in read_jsonl(paths[1]):
            selection = "outlier" if row["outlier"] else "random"
            for key in (
                ("target", row["pair"], selection, row["target_test_index"]),
                ("seed", row["pair"], selection, row["seed"]),
            ):
                if key in seen:
                    raise UserInputError(
                        f"{workdir}: {key[0]} {key[-1]} of pair {row['pair']} is "
                        "already in an earlier run; pool runs with distinct targets "
                        "and seeds"
                    )
                seen.add(key)
            rows.append(row)
    return rows


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
    the plane of u = mu_base - mu_target and the last layer's theta
    (`analysis.frogs.project`)."""
    styles = {
        "target_class": dict(label="target class", s=8, c="tab:blue", alpha=0.5),
        "base_class": dict(label="base class", s=8, c="tab:orange", alpha=0.5),
        "poisons": dict(s=18, marker="^", c="tab:red"),
        "target": dict(s=120, marker="*", c="k"),
    }
    fig, axes = panels(2 * len(figures), ncols=2, size=(4.5, 3.6))
    views = [(pair, when) for pair in figures for when in WHEN]
    for ax, (pair, when) in zip(axes, views, strict=True):
        *features, theta = figures[pair][when]
        draw_points(ax, project(features, n_probes, theta), styles)
        label(
            ax,
            f"{pair}: {when} retraining",
            "along u = mu_base - mu_target (centroids at 0, 1)",
            "along theta, orthogonal to u",
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
    found = effects(rows, opacities, counts) if rows else {}
    if rows:
        png = os.path.join(workdir, "success.png")
        plot_success(summary, list(pairs), opacities, counts, png)
        plot_projection(figures, config.probes, os.path.join(workdir, "features.png"))
    result = {
        "experiment": "frogs_e2e",
        "model": f"{config.model} pretrained on CIFAR-10, fine-tuned end to end",
        # Each victim: these clean images plus its n poisons (rows' train_size).
        "clean_training_images": rows[0]["clean_train_size"] if rows else 0,
        "victims": list(plan.labels),
        "settings": summary,
        "effects": found,
        "published": PUBLISHED,
    }
    write_json(os.path.join(workdir, "summary.json"), result)
    for key, s in summary.items():
        accuracy = 100 * s["mean_test_accuracy"]
        print(f"{key}: success {rate_text(s)}, test accuracy {accuracy:.2f}%")
    for key, e in found.items():
        if "high" in e:
            print(
                f"{key}: {e['high']} {rate_text(e[e['high']])} vs {e['low']} "
                f"{rate_text(e[e['low']])}; targets only high {e['only_high']}, "
                f"only low {e['only_low']}, McNemar p = {e['mcnemar_p']:.3g}"
            )
        elif "fisher_p" in e:
            print(
                f"{key} at {e['victim']}: outlier {rate_text(e['outlier'])} vs "
                f"random {rate_text(e['random'])}, Fisher p = {e['fisher_p']:.3g}"
            )
    return result
