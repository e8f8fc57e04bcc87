"""Class-shielding poison generator on CIFAR-10 (attacks/shielding.py).

Classes: a shield class (its images become poisons), a protected class (the
victim should stop recognising it) and control classes (it should keep them). The
frozen feature extractor is the shipped pretrained ResNet-20 (64 features; the
original used an ImageNet ResNet-50 for the generator and VGG16 for the victim);
the dummy victim is that extractor with a fresh 10-way linear head.

Every outer step draws P = sub_batch x sub_batches shield and protected images and
P control images from the training subset, generates the poisons, trains a fresh
head on them through the unroll and updates the generator by the gradient of the
shielding loss through that training. Every `eval_every` steps, and at the end,
the same procedure without the update runs on held-out (test split) images.
Reported over training, on training and held-out images: the dummy victim's
accuracy on the protected class against its accuracy on clean shield images, on
the poisons (labelled shield) and on the control classes, and the poisons' l2 /
l_inf distance from their shield images; next to a baseline victim trained on the
unmodified shield images (what the same head does without the generator).

Progress is kept by `sweep.resume_steps`: the generator state is saved at every
evaluation point (`generator/checkpoints`) and the point's rows are committed, so
a killed run resumes from the last saved state. Each step's draws and key are
fixed by the config's seed and the step's index, so a resumed run computes what an
uninterrupted one does.
"""

from __future__ import annotations

import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxpoison.attacks import shielding as sh
from jaxpoison.data import (
    CIFAR10_CLASSES,
    check_choice,
    check_classes,
    check_distinct,
    load_dataset,
)
from jaxpoison.errors import UserInputError
from jaxpoison.models import load_pretrained, shipped_weights
from jaxpoison.plots import new_figure, save_figure
from jaxpoison.results import write_json
from jaxpoison.sweep import eval_points, key_chain, resume_steps, trial_seeds
from jaxpoison.victims import cache_features, make_train_data

DATASETS = ("cifar10", "cifar10_sample")
METRICS = (
    "loss",
    "protected_accuracy",
    "shield_accuracy",
    "poison_accuracy",
    "control_accuracy",
    "distance_l2",
    "distance_linf",
)


def check_config(config):
    check_choice(config.dataset, DATASETS, "dataset")
    control = tuple(int(c) for c in config.control_classes) or tuple(
        c
        for c in range(len(CIFAR10_CLASSES))
        if c not in (config.shield_class, config.protected_class)
    )
    classes = (config.shield_class, config.protected_class, *control)
    check_classes(classes, len(CIFAR10_CLASSES), "class")
    check_distinct(classes, "shield, protected and control classes")
    if config.steps < 0 or config.eval_every < 1 or config.per_class < 1:
        raise UserInputError("steps >= 0, eval_every >= 1, per_class >= 1")
    return sh.ShieldConfig(**config.shield), control


def class_rows(labels: np.ndarray, classes, per_class: int | None) -> dict:
    out = {}
    for c in classes:
        idx = np.flatnonzero(labels == c)
        out[c] = idx if per_class is None else idx[:per_class]
        if len(out[c]) == 0:
            raise UserInputError(f"no images of class {c}")
    return out


class Split(NamedTuple):
    """A split's images of the experiment's classes and their cached features."""

    images: np.ndarray
    labels: jax.Array
    features: jax.Array
    rows: dict  # class -> rows of that class


def load_split(model, variables, config, split: str, per_class, classes) -> Split:
    """The images of `classes` in `split` (the first `per_class` of each)."""
    ds = load_dataset(config.dataset, split, config.data_dir or None)
    rows = class_rows(ds.labels, classes, per_class)
    keep = np.sort(np.concatenate(list(rows.values())))
    images, labels = ds.images[keep], ds.labels[keep].astype(np.int32)
    features = cache_features(model, variables, make_train_data(images, labels))
    rows = class_rows(labels, classes, None)
    return Split(images, jnp.asarray(labels), features.features, rows)


def draw(rng, rows: np.ndarray, n: int) -> np.ndarray:
    return rng.choice(rows, n, replace=len(rows) < n)


def draw_step(rng, rows: dict, config, cfg: sh.ShieldConfig, control) -> dict:
    """One step's shield/protected/control rows (and clean fill) of a split."""
    p = cfg.poisons_per_step
    drawn = {
        "shield": draw(rng, rows[config.shield_class], p),
        "protected": draw(rng, rows[config.protected_class], p),
    }
    c_pool = np.concatenate([rows[c] for c in control])
    drawn["control"] = draw(rng, c_pool, p)
    if cfg.clean_per_sub_batch:
        pool = np.concatenate([c_pool, rows[config.protected_class]])
        drawn["clean"] = draw(
            rng, pool, cfg.sub_batches * cfg.clean_per_sub_batch
        ).reshape(cfg.sub_batches, cfg.clean_per_sub_batch)
    return drawn


def step_inputs(split: Split, drawn: dict) -> sh.StepInputs:
    """The images, cached features and labels of one step's draws."""
    images, labels, features, _ = split
    s, t, c = drawn["shield"], drawn["protected"], drawn["control"]
    clean = None
    if "clean" in drawn:
        clean = (features[drawn["clean"]], labels[drawn["clean"]])
    return sh.StepInputs(
        shield=jnp.asarray(images[s], jnp.float32) / 255.0,
        shield_features=features[s],
        shield_labels=labels[s],
        protected_features=features[t],
        protected_labels=labels[t],
        control_features=features[c],
        control_labels=labels[c],
        clean=clean,
    )


def mean_metrics(batches: list[dict]) -> dict[str, float]:
    return {m: float(np.mean([b[m] for b in batches])) for m in METRICS}


def log_point(rows: list[dict]) -> None:
    """The held-out accuracies (%) and distance of an evaluation point's rows."""
    for h in rows:
        if h["split"] == "held_out":
            accuracies = " ".join(
                f"{m} {100 * h[f'{m}_accuracy']:.1f}%"
                for m in ("protected", "shield", "control", "poison")
            )
            print(
                f"step {h['step']} ({h['poisons']} shield images): held-out "
                f"{accuracies}, l2 {h['distance_l2']:.2f}"
            )


def plot_accuracies(rows: list[dict], path: str) -> None:
    """Held-out accuracies of the dummy victim over the generator's steps."""
    held = [r for r in rows if r["split"] == "held_out" and r["poisons"] == "generated"]
    if not held:
        return
    fig, ax = new_figure()
    steps = [r["step"] for r in held]
    for m, label in (
        ("protected", "protected class"),
        ("shield", "clean shield images"),
        ("control", "control classes"),
        ("poison", "poisons (as shield)"),
    ):
        ax.plot(steps, [100 * r[f"{m}_accuracy"] for r in held], "o-", label=label)
    ax.set_xlabel("generator step")
    ax.set_ylabel("dummy victim's held-out accuracy (%)")
    ax.legend()
    save_figure(fig, path)


def point_metrics(rows: list[dict], step: int) -> dict:
    """The generator's metrics at one evaluation point, by split."""
    got = [r for r in rows if r["step"] == step and r["poisons"] == "generated"]
    return {"step": step, **{r["split"]: {m: r[m] for m in METRICS} for r in got}}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains the generator; writes results.jsonl (one row per evaluation point
    and split) and summary.json."""
    t0 = time.time()
    cfg, control = check_config(config)
    model, variables = load_pretrained(
        config.model, config.weights or shipped_weights(config.model)
    )
    classes = (config.shield_class, config.protected_class, *control)
    train = load_split(model, variables, config, "train", config.per_class, classes)
    held_split = load_split(
        model, variables, config, "test", config.per_class_held_out or None, classes
    )

    def extract(x):
        return model.apply(variables, x, train=False)[1]

    # Streams from the config seed (sweep/keys.py): the generator's keys and the
    # training draws; the held-out draws; the held-out victims' keys. Every
    # step's draws and key are made here, so a resumed run uses the same ones.
    gen_seed, held_seed, held_key_seed = (int(s) for s in trial_seeds(config.seed, 3))
    key, init_key = jax.random.split(jax.random.key(gen_seed))
    state0 = sh.init(init_key, train.features.shape[-1], model.input_shape, cfg)
    step_keys = key_chain(key, config.steps)
    rng = np.random.default_rng(gen_seed)
    draws = [
        draw_step(rng, train.rows, config, cfg, control) for _ in range(config.steps)
    ]
    held_rng = np.random.default_rng(held_seed)
    held_out = [
        step_inputs(
            held_split, draw_step(held_rng, held_split.rows, config, cfg, control)
        )
        for _ in range(config.eval_batches)
    ]
    held_keys = jax.random.split(jax.random.key(held_key_seed), config.eval_batches)

    step = jax.jit(sh.make_step(extract, cfg, model.num_classes))
    loss = sh.make_outer_loss(extract, cfg, model.num_classes)
    evaluate = jax.jit(
        lambda p, i, k, b: loss(p, i, k, baseline=b)[1], static_argnums=3
    )

    def held_out_row(step: int, params, baseline: bool = False) -> dict:
        batches = [
            jax.device_get(evaluate(params, i, k, baseline))
            for i, k in zip(held_out, held_keys, strict=True)
        ]
        poisons = "unmodified" if baseline else "generated"
        return {"step": step, "poisons": poisons, "split": "held_out"} | mean_metrics(
            batches
        )

    def train_step(state, s: int):
        return step(state, step_inputs(train, draws[s]), step_keys[s])

    def point_rows(i: int, point: int, state, window: list) -> list[dict]:
        rows = [held_out_row(point, state.params)]
        if window:  # training batches since the last evaluation (pre-update)
            train_row = {"step": point, "poisons": "generated", "split": "train"}
            rows.append(train_row | mean_metrics(window))
        if i == 0:  # the same dummy victim on the unmodified shield images
            rows.append(held_out_row(point, state.params, baseline=True))
        log_point(rows)
        return rows

    points = eval_points(config.steps, config.eval_every)
    rows = resume_steps(train_step, state0, points, point_rows, workdir, "generator")
    plot_accuracies(rows, os.path.join(workdir, "accuracy.png"))
    baseline_row = next(r for r in rows if r["poisons"] == "unmodified")
    summary = {
        "experiment": "shielding",
        "classes": {
            "shield": CIFAR10_CLASSES[config.shield_class],
            "protected": CIFAR10_CLASSES[config.protected_class],
            "control": [CIFAR10_CLASSES[c] for c in control],
        },
        "steps": config.steps,
        "first": point_metrics(rows, int(points[0])),
        "final": point_metrics(rows, int(points[-1])),
        "baseline_held_out": {m: baseline_row[m] for m in METRICS},
        "wall_seconds": time.time() - t0,
    }
    write_json(os.path.join(workdir, "summary.json"), summary)
    return summary
