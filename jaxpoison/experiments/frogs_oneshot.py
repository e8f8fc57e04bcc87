"""Poison Frogs' "one-shot kill" on a transfer-learning victim (Shafahi et al. 2018).

Sec. 4.1 of the paper: a frozen pretrained feature extractor whose last layer is
retrained from a cold start (Adam, lr 0.01, 100 epochs) on a clean training set PLUS
ONE poison. The poison is crafted with Algorithm 1 (forward-backward splitting, beta =
beta0 * (n_features / n_input)^2, beta0 = 0.25) from a base image of another class so
that its penultimate features collide with the target's; success means the target
(a test image) is classified as the base class.

Here, per target (a test image the pretrained model classifies correctly):

* A base class (two-class task: the other class; more classes: drawn uniformly
  among the others) and a base image drawn from the TRAINING split outside the
  clean training subset.
* Training rows = the clean subset (the first `per_class` training images of every
  class of the task) + the base's own row. The poisoned victim trains with the
  poison swapped into that row (carrying the base's label: clean label), i.e. on the
  clean subset plus one poison, as in the paper. The clean victim of the same trial
  trains on the same rows with the poison slot unused (index -1), so the base row
  enters unpoisoned, with the same seed (head initialisation and shuffling): the
  only difference between the two victims is the poison.
* Reported: success, the poisoned victim's confidence in the base class for the
  target, clean test accuracy of both victims (the target left out) and their
  difference, and the decision boundary's angular deviation: the angle between the
  clean and poisoned victims' last-layer weight vectors, for two classes the
  difference of the two class rows (the normal of the boundary), for more classes
  the base class's row; `pair_angle_deg` is the angle of the (base - target) row
  difference, the boundary between the two classes involved. Biases are left out.
  `seed_angle_deg` is the same angle between the clean victim and a clean victim
  with another seed: how far the boundary turns with no poison at all (a cold-start
  head does not converge to one direction in 100 epochs), the scale to read the
  poison's angle against. `poison_fit` says whether the poisoned victim classifies
  the poison itself as the base class.

A chunk of targets is one jitted program: crafting of all its poisons (one per
target, a batch of independent problems) and training of all its victims (for every
`per_class` setting, a poisoned and two clean victims per target, vmapped on cached
features). `per_class` may list several subset sizes, to compare the regime the
paper argues from, N_train <= n_features * n_classes (the last layer can fit any
labelling of the training set, so it fits the poison), with larger training sets.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxpoison.analysis.frogs import boundary_angles, head_kernel
from jaxpoison.attacks import feature_collision as fc
from jaxpoison.checks import check_known, require
from jaxpoison.data import CIFAR10_CLASSES, check_classes
from jaxpoison.errors import UserInputError
from jaxpoison.experiments.common import load_pretrained_and_data, row_pool
from jaxpoison.models import head_variables, task_model
from jaxpoison.plots import draw_histograms, label, panels, save_figure
from jaxpoison.results import rate_summary, write_json, write_jsonl
from jaxpoison.summaries import group_rows, group_summary, rate_text
from jaxpoison.sweep import Trial, run_trials, trial_keys, trial_seeds
from jaxpoison.sweep.sharding import trial_mesh
from jaxpoison.victims import (
    TrainConfig,
    cache_features,
    make_train_data,
    train_vmapped,
)

DATASETS = ("cifar10", "cifar10_sample")
# Shafahi et al. 2018, Sec. 4.1 (InceptionV3 pretrained on ImageNet, dog vs fish,
# 1099 targets): every target misclassified, median confidence 99.6%, test
# accuracy down 0.2% on average and 0.4% at worst.
PUBLISHED = {
    "success_rate": 1.0,
    "median_misclassification_confidence": 0.996,
    "mean_accuracy_drop": 0.002,
    "worst_accuracy_drop": 0.004,
}
TARGET_FLOATS = (
    "feature_distance",
    "base_feature_distance",
    "perturbation_l2",
    "perturbation_linf",
)
VICTIM_FLOATS = (
    "base_class_prob",
    "clean_victim_base_class_prob",
    "poisoned_accuracy",
    "clean_accuracy",
    "angle_deg",
    "pair_angle_deg",
    "seed_angle_deg",
    "train_accuracy",
)


def oneshot_trials(model, craft_cfg, victim_cfg, poison_8bit, shared, spec):
    """One chunk of targets: craft one poison each, train every victim, evaluate.

    Args:
      model: the task's model (frozen pretrained extractor, a head of the task's
        number of classes).
      shared: `pool` (TrainData of the clean subset + every base, with cached
        features; task labels 0..K-1), `variables` (the task model's), the task's
        test set (`test_features`, `test_labels`) and
        `clean_subsets` (per `per_class` setting, the pool rows of the clean subset).
      spec: per target T: `target_image` in [0, 1], `target_pos` (its row in the
        task's test set),
        `base_pool_row` (the base's pool row), `base_label` (the base class, task
        label) and `seed` (the victims').

    Returns:
      Arrays of shape (T,) (crafting) or (T, S) (per `per_class` setting S).
    """
    pool_data, variables = shared["pool"], shared["variables"]
    test_features, test_labels = shared["test_features"], shared["test_labels"]
    target_pos, base_pool_row = spec["target_pos"], spec["base_pool_row"]
    base_label = spec["base_label"]
    t = target_pos.shape[0]
    target_images = spec["target_image"]
    bases = pool_data.images[base_pool_row].astype(target_images.dtype) / 255.0
    # Shafahi et al. 2018, Alg. 1: forward (feature) step, backward (prox) step.
    poisons, state = fc.craft(model, variables, bases, target_images, craft_cfg)
    if poison_8bit:  # a poison enters the training set as an 8-bit image
        poisons = jnp.round(poisons * 255.0) / 255.0
    target_feats = fc.target_features(model, variables, target_images)
    poison_feats = fc.target_features(model, variables, poisons)
    target_label = test_labels[target_pos]
    ones = jnp.ones((t, 1), jnp.int32)
    # Trials 0..T-1: poisoned victims; T..2T-1: clean victims (poison slot unused,
    # same seeds); 2T..3T-1: clean victims with other seeds, the reference for how
    # far the boundary turns with no poison at all.
    data = pool_data._replace(
        poison_images=jnp.concatenate([poisons] * 3)[:, None],
        poison_indices=jnp.concatenate([base_pool_row[:, None], -ones, -ones]),
        poison_labels=jnp.concatenate([base_label] * 3)[:, None],
    )
    keys = trial_keys(spec["seed"])
    other = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    keys = jnp.concatenate([keys, keys, other])
    not_target = jnp.arange(test_features.shape[0])[None] != target_pos[:, None]
    out: dict[str, list] = {}
    for clean_rows in shared["clean_subsets"]:
        subset = jnp.concatenate(
            [
                jnp.broadcast_to(clean_rows, (t, clean_rows.shape[0])),
                base_pool_row[:, None],
            ],
            axis=1,
        )
        # A batch larger than the training set is one batch of all of it (PyTorch's
        # DataLoader); saying so keeps the padded last batch within one permutation.
        cfg = dataclasses.replace(
            victim_cfg, batch_size=min(victim_cfg.batch_size, subset.shape[1])
        )
        trained, metrics = train_vmapped(
            model,
            variables,
            data._replace(subset=jnp.concatenate([subset] * 3)),
            keys,
            cfg,
        )
        heads = head_variables(trained)
        heads = jax.tree.map(lambda x: x[: 2 * t], heads)
        logits = jax.vmap(lambda h, f: model.apply_head(h, f[None])[0])(
            heads, jnp.concatenate([target_feats, target_feats])
        )
        probs = jax.nn.softmax(logits)
        pred = jnp.argmax(logits, -1)
        test_pred = jax.vmap(
            lambda h: jnp.argmax(model.apply_head(h, test_features), -1)
        )(heads)
        correct = (test_pred == test_labels[None]) & jnp.concatenate(
            [not_target, not_target]
        )
        n_test = not_target.sum(-1).astype(jnp.float32)
        accuracy = correct.sum(-1) / jnp.concatenate([n_test, n_test])
        poison_pred = jnp.argmax(
            jax.vmap(lambda h, f: model.apply_head(h, f[None])[0])(
                jax.tree.map(lambda x: x[:t], heads), poison_feats
            ),
            -1,
        )
        kernel = head_kernel(head_variables(trained))
        k_poisoned, k_clean, k_other = kernel[:t], kernel[t : 2 * t], kernel[2 * t :]
        rows = jnp.arange(t)
        values = {
            "prediction": pred[:t],
            "base_class_prob": probs[rows, base_label],
            "clean_victim_prediction": pred[t:],
            "clean_victim_base_class_prob": probs[t + rows, base_label],
            "poisoned_accuracy": accuracy[:t],
            "clean_accuracy": accuracy[t:],
            # Shafahi et al. 2018, Sec. 4.1.1: the decision boundary's rotation.
            **boundary_angles(k_poisoned, k_clean, k_other, base_label, target_label),
            "poison_fit": poison_pred == base_label,
            "train_accuracy": metrics["accuracy"][:t, -1],
        }
        for k, v in values.items():
            out.setdefault(k, []).append(v)
    diff = (poisons - bases).reshape(t, -1)
    return {
        **{k: jnp.stack(v, axis=1) for k, v in out.items()},
        "feature_distance": jnp.linalg.norm(poison_feats - target_feats, axis=-1),
        "base_feature_distance": jnp.linalg.norm(
            fc.target_features(model, variables, bases) - target_feats, axis=-1
        ),
        "craft_iterations": state.iteration,
        "perturbation_l2": jnp.linalg.norm(diff, axis=-1),
        "perturbation_linf": jnp.abs(diff).max(axis=-1),
    }


def task_classes(config) -> dict[str, tuple[int, ...]]:
    """{task name: CIFAR-10 class ids}, validated."""
    tasks = {name: tuple(int(c) for c in cs) for name, cs in config.tasks.items()}
    tasks = dict(sorted(tasks.items(), key=lambda kv: (len(kv[1]), kv[0])))
    require(tasks, "config.tasks is empty: name at least one task")
    for name, classes in tasks.items():
        check_classes(classes, len(CIFAR10_CLASSES), f"task {name}: class")
        require(
            len(set(classes)) == len(classes) >= 2,
            f"task {name}: needs at least two distinct classes, got {classes}",
        )
    return tasks


def check_config(config) -> tuple[fc.FCConfig, TrainConfig, dict, tuple[int, ...]]:
    """Validates everything that needs no data; returns the parsed pieces."""
    check_known("dataset", config.dataset, DATASETS)
    craft_cfg = fc.FCConfig(**config.craft)
    victim_cfg = TrainConfig.from_mapping(config.victim)
    require(
        victim_cfg.mode == "linear" and victim_cfg.cold_start_head,
        "the one-shot kill retrains the last layer from a cold start: "
        "victim.mode must be 'linear' and victim.cold_start_head True",
    )
    tasks = task_classes(config)
    per_class = tuple(int(p) for p in np.atleast_1d(config.per_class))
    require(min(per_class) >= 1, f"per_class={per_class}: each must be >= 1")
    require(
        config.num_targets >= 1 and config.chunk_size >= 1,
        "num_targets and chunk_size must be >= 1",
    )
    return craft_cfg, victim_cfg, tasks, per_class


def make_specs(
    classes: tuple[int, ...],
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    pretrained_pred: np.ndarray,
    per_class: int,
    num_targets: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """Targets (test rows), base classes and base images (train rows outside the
    clean subset, the first `per_class` training images per class)."""
    rng = np.random.default_rng(seed)
    for c in classes:
        n = int(np.sum(train_labels == c))
        if n <= per_class:
            raise UserInputError(
                f"per_class={per_class} leaves no base image outside the clean "
                f"subset: class {c} has {n} training images"
            )
    eligible = np.flatnonzero(
        np.isin(test_labels, classes) & (pretrained_pred == test_labels)
    )
    if num_targets > len(eligible):
        raise UserInputError(
            f"num_targets={num_targets}: only {len(eligible)} test images of classes "
            f"{classes} are classified correctly by the pretrained model"
        )
    target = np.sort(rng.choice(eligible, num_targets, replace=False))
    target_class = test_labels[target]
    others = np.array([[c for c in classes if c != tc] for tc in target_class])
    base_class = others[
        np.arange(num_targets), rng.integers(0, len(classes) - 1, num_targets)
    ]
    base_row = np.empty(num_targets, np.int64)
    for c in classes:
        pool = np.flatnonzero(train_labels == c)[per_class:]
        sel = base_class == c
        base_row[sel] = rng.choice(pool, int(sel.sum()), replace=True)
    return {
        "target_row": target.astype(np.int32),
        "target_class": target_class.astype(np.int32),
        "base_class": base_class.astype(np.int32),
        "base_row": base_row.astype(np.int32),
        "seed": trial_seeds(seed, num_targets),
    }


def run_task(name, classes, config, pieces, data, workdir) -> list[dict]:
    """Runs one task's sweep in `workdir/name`; returns one row per (target, size)."""
    craft_cfg, victim_cfg, per_class = pieces
    train, test, test_features, pretrained, variables = data
    k = len(classes)
    to_task = np.full(len(CIFAR10_CLASSES), -1, np.int32)
    to_task[list(classes)] = np.arange(k)
    specs = make_specs(
        classes,
        train.labels,
        test.labels,
        pretrained,
        max(per_class),
        config.num_targets,
        config.seed,
    )
    firsts = {c: np.flatnonzero(train.labels == c)[: max(per_class)] for c in classes}
    pool = row_pool(len(train.labels), *firsts.values(), specs["base_row"])
    in_task = np.flatnonzero(np.isin(test.labels, classes))
    task_test = row_pool(len(test.labels), in_task)
    specs["target_pos"] = task_test.at(specs["target_row"])
    specs["base_pool_row"] = pool.at(specs["base_row"])
    specs["base_label"] = to_task[specs["base_class"]]
    # Targets are scaled to [0, 1] outside the trial program, as before the trial
    # engine: inside it XLA fuses the division and rounds some pixels differently.
    specs["target_image"] = np.asarray(
        jnp.asarray(test.images[specs["target_row"]], jnp.float32) / 255.0
    )

    model, task_vars = task_model(config.model, variables, k)
    pool_data = cache_features(
        model,
        task_vars,
        make_train_data(train.images[pool.rows], to_task[train.labels[pool.rows]]),
        victim_cfg,
    )
    test_rows = task_test.rows
    shared = {
        "pool": pool_data,
        "variables": task_vars,
        "test_features": jnp.asarray(test_features[test_rows]),
        "test_labels": jnp.asarray(to_task[test.labels[test_rows]]),
        "clean_subsets": tuple(
            np.sort(pool.at(np.concatenate([firsts[c][:p] for c in classes])))
            for p in per_class
        ),
    }
    print(
        f"task {name} (classes {', '.join(CIFAR10_CLASSES[c] for c in classes)}): "
        f"{config.num_targets} targets, victims on {[k * p + 1 for p in per_class]} "
        "training rows (clean subset + the base row)"
    )
    trial = Trial(
        run=functools.partial(
            oneshot_trials, model, craft_cfg, victim_cfg, bool(config.poison_8bit)
        ),
        row=functools.partial(target_rows, name, classes, per_class, test, train),
    )
    return run_trials(
        trial,
        shared,
        specs,
        chunk_size=config.chunk_size,
        workdir=os.path.join(workdir, name),
        mesh=trial_mesh(),
        desc=f"{name} targets",
    )


def target_rows(task, classes, per_class, test, train, spec, out):
    """A target's rows, one per `per_class` setting (task labels mapped back)."""
    base_class, target_class = int(spec["base_class"]), int(spec["target_class"])
    common = {
        "task": task,
        "target_test_index": int(test.example_ids[spec["target_row"]]),
        "target_class": target_class,
        "base_train_index": int(train.example_ids[spec["base_row"]]),
        "base_class": base_class,
        "seed": int(spec["seed"]),
        **{key: float(out[key]) for key in TARGET_FLOATS},
        "craft_iterations": int(out["craft_iterations"]),
    }
    rows = []
    for s, p in enumerate(per_class):
        prediction = classes[int(out["prediction"][s])]
        clean_pred = classes[int(out["clean_victim_prediction"][s])]
        rows.append(
            {
                **common,
                "per_class": p,
                "n_train": len(classes) * p + 1,
                "prediction": prediction,
                "success": prediction == base_class,
                "clean_victim_prediction": clean_pred,
                "clean_victim_correct": clean_pred == target_class,
                "poison_fit": bool(out["poison_fit"][s]),
                **{key: float(out[key][s]) for key in VICTIM_FLOATS},
                "accuracy_drop": float(
                    out["clean_accuracy"][s] - out["poisoned_accuracy"][s]
                ),
            }
        )
    return rows


def summarise_setting(rows: list[dict], n_features: int, n_classes: int) -> dict:
    """One (task, per_class) setting's summary: success with its Wilson interval,
    means and medians (`group_summary`), and the rates the paper's argument needs."""
    summary = group_summary(
        rows,
        (),
        means=(
            "clean_accuracy",
            "poisoned_accuracy",
            "accuracy_drop",
            "angle_deg",
            "pair_angle_deg",
            "seed_angle_deg",
            "poison_fit",
            "feature_distance",
            "base_feature_distance",
            "perturbation_l2",
        ),
        medians=("base_class_prob", "angle_deg", "seed_angle_deg"),
    )["all"]
    success = [r["base_class_prob"] for r in rows if r["success"]]
    n_train = rows[0]["n_train"]
    return {
        **summary,
        "success_where_clean_victim_correct": rate_summary(
            r["success"] for r in rows if r["clean_victim_correct"]
        ),
        # The linear-capacity argument in one number: does the poisoned victim fit
        # the poison (classify it as the base class), and does the target follow?
        "success_where_poison_fit": rate_summary(
            r["success"] for r in rows if r["poison_fit"]
        ),
        "median_misclassification_confidence": (
            float(np.median(success)) if success else float("nan")
        ),
        "worst_accuracy_drop": max(r["accuracy_drop"] for r in rows),
        "max_angle_deg": max(r["angle_deg"] for r in rows),
        "n_train": n_train,
        "n_features": n_features,
        "n_classes": n_classes,
        "n_features_times_classes": n_features * n_classes,
        "n_train_le_features_times_classes": n_train <= n_features * n_classes,
    }


def plot_angles(rows: list[dict], path: str) -> None:
    """Histograms of the angular deviation, a panel per (task, training-set size):
    the poisoned victim's angle next to a clean victim's with another seed (the
    angle that owes nothing to the poison)."""
    groups: dict[tuple, list[dict]] = {}  # tasks in the order they ran
    for r in rows:
        groups.setdefault((r["task"], r["per_class"]), []).append(r)
    sizes = {p for _, p in groups}
    fig, axes = panels(len(groups), ncols=len(sizes), size=(4.0, 3.2))
    for ax, ((task, _), sel) in zip(axes, groups.items(), strict=True):
        angles = {
            "clean, other seed": [r["seed_angle_deg"] for r in sel],
            "poisoned": [r["angle_deg"] for r in sel],
        }
        draw_histograms(ax, angles, colors=("0.6", "tab:green"))
        label(
            ax,
            f"{task}, N_train={sel[0]['n_train']}",
            "angle to the clean victim's boundary (deg)",
            "targets",
        )
    save_figure(fig, path)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs every task; writes results.jsonl, summary.json and angles.png."""
    craft_cfg, victim_cfg, tasks, per_class = check_config(config)
    if craft_cfg.constraint != "prox":
        print(f"note: constraint {craft_cfg.constraint!r}, not Algorithm 1's 'prox'")
    _, variables, train, test, test_features, test_probs = load_pretrained_and_data(
        config
    )
    pretrained = np.argmax(test_probs, -1)
    print(
        f"pretrained {config.model} on {len(test.labels)} {config.dataset} test "
        f"images: {100 * np.mean(pretrained == test.labels):.2f}%"
    )
    data = (train, test, np.asarray(test_features), pretrained, variables)
    pieces = (craft_cfg, victim_cfg, per_class)
    rows = []
    for name, classes in tasks.items():
        rows.extend(run_task(name, classes, config, pieces, data, workdir))
    write_jsonl(os.path.join(workdir, "results.jsonl"), rows)
    n_features = int(test_features.shape[-1])
    settings = {
        f"{task}/per_class={p}": {
            "task": task,
            "classes": list(tasks[task]),
            "per_class": p,
            **summarise_setting(sel, n_features, len(tasks[task])),
        }
        for (task, p), sel in group_rows(rows, ("task", "per_class")).items()
    }
    if rows:
        plot_angles(rows, os.path.join(workdir, "angles.png"))
    summary = {
        "experiment": "frogs_oneshot",
        "extractor": f"{config.model} pretrained on CIFAR-10 (frozen)",
        "dataset": config.dataset,
        "targets_per_task": config.num_targets,
        "settings": settings,
        "published_dog_vs_fish_inceptionv3": PUBLISHED,
    }
    write_json(os.path.join(workdir, "summary.json"), summary)
    for key, s in settings.items():
        print(
            f"{key} (N_train={s['n_train']} "
            f"{'<=' if s['n_train_le_features_times_classes'] else '>'} "
            f"{s['n_features_times_classes']}): success {rate_text(s)}, "
            f"median confidence {100 * s['median_misclassification_confidence']:.1f}%"
            f", accuracy drop mean {100 * s['mean_accuracy_drop']:.2f} / worst "
            f"{100 * s['worst_accuracy_drop']:.2f} points, angle mean "
            f"{s['mean_angle_deg']:.1f} deg (clean victims of other seeds: "
            f"{s['mean_seed_angle_deg']:.1f})"
        )
    return summary
