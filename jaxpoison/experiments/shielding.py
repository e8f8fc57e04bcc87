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
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxpoison.attacks import shielding as sh
from jaxpoison.data import CIFAR10_CLASSES, check_classes, load_dataset
from jaxpoison.errors import UserInputError
from jaxpoison.models import load_pretrained, shipped_weights
from jaxpoison.results import write_json, write_jsonl
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
    if config.dataset not in DATASETS:
        raise UserInputError(
            f"unknown dataset {config.dataset!r}; known: {', '.join(DATASETS)}"
        )
    control = tuple(int(c) for c in config.control_classes) or tuple(
        c
        for c in range(len(CIFAR10_CLASSES))
        if c not in (config.shield_class, config.protected_class)
    )
    classes = (config.shield_class, config.protected_class, *control)
    check_classes(classes, len(CIFAR10_CLASSES), "class")
    if len(set(classes)) != len(classes):
        raise UserInputError(
            f"shield, protected and control classes overlap: {classes}"
        )
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


def draw(rng, rows: np.ndarray, n: int) -> np.ndarray:
    return rng.choice(rows, n, replace=len(rows) < n)


def step_inputs(rng, split, config, cfg: sh.ShieldConfig, control) -> sh.StepInputs:
    """One step's shield/protected/control draws (and clean fill) from a split."""
    images, labels, features, rows = split
    p = cfg.poisons_per_step
    s_rows = draw(rng, rows[config.shield_class], p)
    t_rows = draw(rng, rows[config.protected_class], p)
    c_pool = np.concatenate([rows[c] for c in control])
    c_rows = draw(rng, c_pool, p)
    clean = None
    if cfg.clean_per_sub_batch:
        pool = np.concatenate([c_pool, rows[config.protected_class]])
        f_rows = draw(rng, pool, cfg.sub_batches * cfg.clean_per_sub_batch).reshape(
            cfg.sub_batches, cfg.clean_per_sub_batch
        )
        clean = (features[f_rows], labels[f_rows])
    return sh.StepInputs(
        shield=jnp.asarray(images[s_rows], jnp.float32) / 255.0,
        shield_features=features[s_rows],
        shield_labels=labels[s_rows],
        protected_features=features[t_rows],
        protected_labels=labels[t_rows],
        control_features=features[c_rows],
        control_labels=labels[c_rows],
        clean=clean,
    )


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains the generator; writes history.jsonl and summary.json."""
    cfg, control = check_config(config)
    model, variables = load_pretrained(
        config.model, config.weights or shipped_weights(config.model)
    )
    data_dir = config.data_dir or None
    classes = (config.shield_class, config.protected_class, *control)
    splits = {}
    for name, split, per_class in (
        ("train", "train", config.per_class),
        ("held_out", "test", config.per_class_held_out or None),
    ):
        ds = load_dataset(config.dataset, split, data_dir)
        rows = class_rows(ds.labels, classes, per_class)
        keep = np.sort(np.concatenate(list(rows.values())))
        images, labels = ds.images[keep], ds.labels[keep].astype(np.int32)
        features = cache_features(
            model, variables, make_train_data(images, labels)
        ).features
        rows = class_rows(labels, classes, None)
        splits[name] = (images, jnp.asarray(labels), features, rows)

    def extract(x):
        return model.apply(variables, x, train=False)[1]

    num_classes = model.num_classes
    key = jax.random.key(config.seed)
    key, init_key = jax.random.split(key)
    params = sh.init_generator(
        init_key, splits["train"][2].shape[-1], model.input_shape, cfg
    )
    tx, step = sh.make_generator_step(extract, cfg, num_classes)
    step = jax.jit(step)
    loss = sh.make_outer_loss(extract, cfg, num_classes)
    evaluate = jax.jit(lambda p, i, k: loss(p, i, k)[1])
    baseline = jax.jit(lambda p, i, k: loss(p, i, k, baseline=True)[1])
    opt_state = tx.init(params)
    rng = np.random.default_rng(config.seed)
    eval_rng = np.random.default_rng(config.seed + 1)
    held_out = [
        step_inputs(eval_rng, splits["held_out"], config, cfg, control)
        for _ in range(config.eval_batches)
    ]
    eval_keys = jax.random.split(jax.random.key(config.seed + 2), config.eval_batches)

    def held_out_metrics(p, fn):
        rows = [
            jax.device_get(fn(p, i, k))
            for i, k in zip(held_out, eval_keys, strict=True)
        ]
        return {m: float(np.mean([r[m] for r in rows])) for m in METRICS}

    history = []
    t0 = time.time()
    window = []
    for s in range(config.steps + 1):
        if s % config.eval_every == 0 or s == config.steps:
            row = {
                "step": s,
                "held_out": held_out_metrics(params, evaluate),
                "wall_seconds": time.time() - t0,
            }
            if window:  # training batches since the last evaluation (pre-update)
                row["train"] = {
                    m: float(np.mean([w[m] for w in window])) for m in METRICS
                }
                window = []
            history.append(row)
            h = row["held_out"]
            tr = row.get("train")
            print(
                f"step {s}: held-out protected {100 * h['protected_accuracy']:.1f}% "
                f"shield {100 * h['shield_accuracy']:.1f}% control "
                f"{100 * h['control_accuracy']:.1f}% poisons-as-shield "
                f"{100 * h['poison_accuracy']:.1f}%, l2 {h['distance_l2']:.2f}"
                + (
                    f" | train protected {100 * tr['protected_accuracy']:.1f}% "
                    f"shield {100 * tr['shield_accuracy']:.1f}% control "
                    f"{100 * tr['control_accuracy']:.1f}% loss {tr['loss']:.3f}"
                    if tr
                    else ""
                )
            )
        if s == config.steps:
            break
        inputs = step_inputs(rng, splits["train"], config, cfg, control)
        key, k = jax.random.split(key)
        params, opt_state, _, aux = step(params, opt_state, inputs, k)
        window.append(jax.device_get(aux))
    summary = {
        "experiment": "shielding",
        "classes": {
            "shield": CIFAR10_CLASSES[config.shield_class],
            "protected": CIFAR10_CLASSES[config.protected_class],
            "control": [CIFAR10_CLASSES[c] for c in control],
        },
        "shield_config": dataclasses.asdict(cfg),
        "steps": config.steps,
        "first": history[0],
        "final": history[-1],
        "baseline_held_out": held_out_metrics(params, baseline),
        "wall_seconds": time.time() - t0,
    }
    b = summary["baseline_held_out"]
    print(
        f"baseline (unmodified shield images), held-out: protected "
        f"{100 * b['protected_accuracy']:.1f}% shield {100 * b['shield_accuracy']:.1f}%"
        f" control {100 * b['control_accuracy']:.1f}%"
    )
    write_jsonl(os.path.join(workdir, "history.jsonl"), history)
    write_json(os.path.join(workdir, "summary.json"), summary)
    return summary
