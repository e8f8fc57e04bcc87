"""MetaPoison against Poison Frogs on one shared setup (Huang et al. 2020).

The setup is the authors' quickstart: a CIFAR-10 training subset (the first
`per_class` training images of every class), a target = the `target_id`-th test
image of `target_class` (bird), bases = the first `num_poisons` training images of
`poison_class` (dog), adversarial label = the poison class. Per target:

1. MetaPoison poisons (attacks/metapoison.py: K unrolled SGD steps of M staggered
   surrogates, Adam on the perturbation, l_inf eps 8/255).
2. Poison Frogs poisons on the same bases and target (attacks/feature_collision.py,
   the benchmark's l_inf variant in the same eps-ball, features of the pretrained
   ResNet-20), the usual baseline of the MetaPoison paper.
3. Victims trained on the subset with the poisons swapped into the bases' rows
   (clean label), seeds vmapped (`train_vmapped`): fine-tuned from the pretrained
   ResNet-20, and trained from scratch. The same victims on the unperturbed bases
   ("clean") give the rate at which the target is misclassified anyway.

Success = the victim classifies the target as the adversarial class. Reported per
(poisons, victim): success rate over targets x seeds with 95% Wilson intervals,
the victims' test accuracy (target left out) and the target's mean CW margin.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxpoison.attacks import feature_collision as fc
from jaxpoison.attacks import metapoison as mp
from jaxpoison.data import CIFAR10_CLASSES, check_classes, load_dataset
from jaxpoison.errors import UserInputError
from jaxpoison.models import load_pretrained, shipped_weights
from jaxpoison.results import rate_summary, write_json, write_jsonl
from jaxpoison.victims import TrainConfig, evaluate, make_train_data, train_vmapped

DATASETS = ("cifar10", "cifar10_sample")
ATTACKS = ("clean", "metapoison", "frogs")


def check_config(config):
    """Parsed pieces; every input error is one line."""
    if config.dataset not in DATASETS:
        raise UserInputError(
            f"unknown dataset {config.dataset!r}; known: {', '.join(DATASETS)}"
        )
    check_classes(
        (config.target_class, config.poison_class), len(CIFAR10_CLASSES), "class"
    )
    if config.target_class == config.poison_class:
        raise UserInputError("target_class and poison_class must differ")
    if min(config.num_poisons, config.num_targets, config.seeds, config.per_class) < 1:
        raise UserInputError("num_poisons, num_targets, seeds, per_class must be >= 1")
    if config.num_poisons > config.per_class:
        raise UserInputError(
            f"num_poisons={config.num_poisons}: the bases are the first images of "
            f"the poison class in the subset, per_class={config.per_class}"
        )
    craft_cfg = mp.MetaPoisonConfig(**config.craft)
    frogs_cfg = fc.FCConfig(**config.frogs)
    victims = {name: TrainConfig.from_mapping(v) for name, v in config.victims.items()}
    for name in victims:
        if name not in ("finetune", "scratch"):
            raise UserInputError(f"unknown victim {name!r}: finetune, scratch")
    return craft_cfg, frogs_cfg, victims


def subset_rows(labels: np.ndarray, per_class: int) -> np.ndarray:
    """The first `per_class` rows of every class, in class order (the authors'
    truncated_cifar10 sorts the subset by label)."""
    rows = []
    for c in range(len(CIFAR10_CLASSES)):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            raise UserInputError(
                f"per_class={per_class}: class {c} has {len(idx)} training images"
            )
        rows.append(idx[:per_class])
    return np.concatenate(rows)


def victims_on(model, pretrained, images, labels, rows, poisons, kind, cfg, keys):
    """Victims (one per key) on the subset with `poisons` in `rows`."""
    data = make_train_data(images, labels, poisons, rows.astype(np.int32), labels[rows])
    if kind == "finetune":
        return train_vmapped(model, pretrained, data, keys, cfg)[0]
    inits = jax.vmap(model.init)(keys)
    return train_vmapped(model, inits, data, keys, cfg, variables_axis=0)[0]


def score(model, trained, target, test_images, test_labels, adv: int):
    """Per victim (leading axis of `trained`): the target's predicted class, its CW
    margin toward `adv` (negative = success) and the test accuracy."""

    def one(v):
        logits = model.apply(v, jnp.asarray(target))[0]
        margin = mp.adversarial_loss(logits, jnp.array([adv]), "cw")
        accuracy = evaluate(model, v, test_images, test_labels)["accuracy"]
        return jnp.argmax(logits[0]), margin, accuracy

    pred, margin, accuracy = jax.vmap(one)(trained)
    return np.asarray(pred), np.asarray(margin), np.asarray(accuracy)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Crafts and evaluates every target; writes results.jsonl and summary.json."""
    craft_cfg, frogs_cfg, victim_cfgs = check_config(config)
    model, pretrained = load_pretrained(
        config.model, config.weights or shipped_weights(config.model)
    )
    data_dir = config.data_dir or None
    train_set = load_dataset(config.dataset, "train", data_dir)
    test_set = load_dataset(config.dataset, "test", data_dir)
    rows = subset_rows(train_set.labels, config.per_class)
    images, labels = train_set.images[rows], train_set.labels[rows].astype(np.int32)
    base_rows = np.flatnonzero(labels == config.poison_class)[: config.num_poisons]
    clean_rows = np.setdiff1d(np.arange(len(labels)), base_rows)
    target_pool = np.flatnonzero(test_set.labels == config.target_class)
    if config.target_id + config.num_targets > len(target_pool):
        raise UserInputError(
            f"target_id + num_targets = {config.target_id + config.num_targets}: "
            f"only {len(target_pool)} test images of class {config.target_class}"
        )
    n_test = min(config.test_images, len(test_set.labels))
    bases = images[base_rows].astype(np.float32) / 255.0
    results = []
    t0 = time.time()
    for t in range(config.num_targets):
        target_row = int(target_pool[config.target_id + t])
        target = test_set.images[target_row][None].astype(np.float32) / 255.0
        keep = np.arange(n_test) != target_row
        test_images, test_labels = (
            test_set.images[:n_test][keep],
            test_set.labels[:n_test][keep],
        )
        problem = mp.CraftProblem(
            images=images,
            labels=labels,
            clean_rows=clean_rows,
            bases=bases,
            base_labels=labels[base_rows],
            targets=target,
            adv_labels=np.array([config.poison_class], np.int32),
        )
        seed = config.seed + t
        adv = config.poison_class

        def log(h, t=t):
            if h["craft_step"] % config.log_every == 0:
                print(
                    f"target {t} craft step {h['craft_step']}: adversarial loss "
                    f"{h['adversarial_loss']:.3f} (surrogate epochs "
                    f"{h['surrogate_epochs']}), {time.time() - t0:.0f} s"
                )

        meta_poisons, info = mp.craft(
            model, pretrained, problem, craft_cfg, jax.random.key(seed), log=log
        )
        frog_poisons, _ = fc.craft(
            model,
            pretrained,
            jnp.asarray(bases),
            jnp.broadcast_to(jnp.asarray(target), bases.shape),
            frogs_cfg,
        )
        poison_sets = {
            "clean": jnp.asarray(bases),
            "metapoison": meta_poisons,
            "frogs": frog_poisons,
        }
        if config.poison_8bit:  # poisons enter a dataset as 8-bit images
            poison_sets = {
                k: jnp.round(v * 255.0) / 255.0 for k, v in poison_sets.items()
            }
        keys = jax.random.split(jax.random.key(seed + 10_000), config.seeds)
        for attack, poisons in poison_sets.items():
            linf = float(jnp.abs(poisons - bases).max())
            for kind, cfg in victim_cfgs.items():
                trained = victims_on(
                    model,
                    pretrained,
                    images,
                    labels,
                    base_rows,
                    poisons,
                    kind,
                    cfg,
                    keys,
                )
                pred, margin, accuracy = score(
                    model, trained, target, test_images, test_labels, adv
                )
                for s in range(config.seeds):
                    results.append(
                        {
                            "target": t,
                            "target_row": target_row,
                            "attack": attack,
                            "victim": kind,
                            "seed": s,
                            "prediction": int(pred[s]),
                            "success": bool(pred[s] == config.poison_class),
                            "cw_margin": float(margin[s]),
                            "test_accuracy": float(accuracy[s]),
                            "poison_linf": linf,
                        }
                    )
                print(
                    f"target {t} {attack:10s} {kind:8s}: success "
                    f"{int((pred == config.poison_class).sum())}/{config.seeds}, "
                    f"test accuracy {100 * float(accuracy.mean()):.1f}%, "
                    f"l_inf {255 * linf:.1f}/255"
                )
        results.append(
            {"target": t, "history": info["history"], "kind": "craft_history"}
        )
    rows_out = [r for r in results if r.get("kind") != "craft_history"]
    summary = {
        "experiment": "metapoison",
        "setup": {
            "dataset": config.dataset,
            "train_images": int(len(labels)),
            "target_class": config.target_class,
            "poison_class": config.poison_class,
            "num_poisons": config.num_poisons,
            "num_targets": config.num_targets,
            "seeds": config.seeds,
            "craft": dataclasses.asdict(craft_cfg),
            "frogs": dataclasses.asdict(frogs_cfg),
        },
        "results": {},
        "wall_seconds": time.time() - t0,
    }
    for attack in ATTACKS:
        for kind in victim_cfgs:
            sel = [r for r in rows_out if r["attack"] == attack and r["victim"] == kind]
            summary["results"][f"{attack}/{kind}"] = {
                "success": rate_summary(r["success"] for r in sel),
                "test_accuracy": float(np.mean([r["test_accuracy"] for r in sel])),
                "cw_margin_mean": float(np.mean([r["cw_margin"] for r in sel])),
            }
    summary["craft_history"] = [
        r["history"] for r in results if r.get("kind") == "craft_history"
    ]
    write_jsonl(os.path.join(workdir, "results.jsonl"), rows_out)
    write_json(os.path.join(workdir, "summary.json"), summary)
    for key, s in summary["results"].items():
        r = s["success"]
        print(
            f"{key:22s} success {100 * r['rate']:.1f}% [{100 * r['ci95_low']:.1f}, "
            f"{100 * r['ci95_high']:.1f}] of {r['n']}, test accuracy "
            f"{100 * s['test_accuracy']:.1f}%, CW margin {s['cw_margin_mean']:.2f}"
        )
    return summary
