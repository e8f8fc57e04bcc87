"""Quickstart: a pretrained victim, poisoned trials, one vmapped program per chunk.

Runs on what ships inside the package (a real CIFAR-10 sample and the pretrained
ResNet-20), offline, in about a minute on a 2-core CPU:

1. Evaluates the pretrained ResNet-20 on the sample's test images.
2. A sweep of trials of the simplest targeted poisoning baseline (dirty-label
   injection): each trial picks a target test image and a base class, and injects
   `n` copies of the target, labelled as the base class, in place of `n` random
   training rows. The victim retrains the last layer from a cold start on the frozen
   pretrained features (the transfer-learning victim of Poison Frogs). Success = the
   target is classified as the base class. n = 0 trials are the clean control.
   All trials of a chunk are one jit-compiled, vmapped program; poison counts share
   one shape through unused poison slots.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxpoison.data import load_cifar10_sample
from jaxpoison.errors import UserInputError
from jaxpoison.experiments.common import pretrained_model
from jaxpoison.models import head_variables
from jaxpoison.results import write_json
from jaxpoison.summaries import group_summary, rate_text
from jaxpoison.sweep import Trial, run_trials, trial_keys, trial_seeds
from jaxpoison.sweep.sharding import trial_mesh
from jaxpoison.victims import (
    TrainConfig,
    cache_features,
    evaluate,
    make_train_data,
    train_vmapped,
)


def make_specs(config, train_labels, test_labels, num_classes) -> dict[str, np.ndarray]:
    """Trials: every (target, count) pair, base class and poisoned rows by seed."""
    rng = np.random.default_rng(config.seed)
    counts = np.asarray(config.poison_counts, np.int32)
    if counts.max() > len(train_labels):
        raise UserInputError(
            f"impossible budget: {counts.max()} poisons > {len(train_labels)} images"
        )
    if config.num_targets > len(test_labels):
        raise UserInputError(
            f"num_targets={config.num_targets} > the {len(test_labels)} test images"
        )
    targets = rng.choice(len(test_labels), config.num_targets, replace=False)
    target = np.repeat(targets, len(counts))
    count = np.tile(counts, config.num_targets)
    true = test_labels[target]
    base = (true + rng.integers(1, num_classes, len(target))) % num_classes
    slots = counts.max()
    rows = np.stack(
        [rng.choice(len(train_labels), slots, replace=False) for _ in target]
    )
    rows = np.where(np.arange(slots)[None] < count[:, None], rows, -1)
    return {
        "target": target.astype(np.int32),
        "base_class": base.astype(np.int32),
        "n_poisons": count,
        "poison_rows": rows.astype(np.int32),
        "seed": trial_seeds(config.seed, len(target)),
    }


def poisoned_victims(model, train_cfg, shared, spec):
    """One chunk of trials: vmapped victims trained with the targets injected.

    `shared` holds the cached clean features, the pretrained variables and the test
    set; `spec` the chunk's targets, base classes, poisoned rows and seeds. Returns
    per-trial arrays.
    """
    clean, variables, test_features, test_images, test_labels = shared
    target, base_class = spec["target"], spec["base_class"]
    poison_rows = spec["poison_rows"]
    t = target.shape[0]
    poisons = jnp.broadcast_to(
        test_images[target][:, None],
        (t, poison_rows.shape[1], *test_images.shape[1:]),
    )
    labels = jnp.broadcast_to(base_class[:, None], poison_rows.shape)
    data = clean._replace(
        poison_images=poisons, poison_indices=poison_rows, poison_labels=labels
    )
    trained, metrics = train_vmapped(
        model, variables, data, trial_keys(spec["seed"]), train_cfg
    )
    logits = jax.vmap(lambda h: model.apply_head(h, test_features))(
        head_variables(trained)
    )
    probs = jax.nn.softmax(logits)
    preds = jnp.argmax(logits, -1)
    not_target = jnp.arange(test_features.shape[0])[None] != target[:, None]
    correct = (preds == test_labels[None]) & not_target
    return {
        "target_prediction": preds[jnp.arange(t), target],
        "target_base_prob": probs[jnp.arange(t), target, base_class],
        "clean_accuracy": correct.sum(-1) / not_target.sum(-1),
        "train_accuracy": metrics["accuracy"][:, -1],
    }


def trial_row(test_ids, test_labels, spec, out) -> dict:
    """A trial's row: the target, its poisoning and what the victim predicts."""
    target = int(spec["target"])
    return {
        "target_test_index": int(test_ids[target]),
        "target_class": int(test_labels[target]),
        "base_class": int(spec["base_class"]),
        "n_poisons": int(spec["n_poisons"]),
        "seed": int(spec["seed"]),
        "target_prediction": int(out["target_prediction"]),
        "success": bool(out["target_prediction"] == spec["base_class"]),
        "target_base_prob": float(out["target_base_prob"]),
        "clean_accuracy": float(out["clean_accuracy"]),
    }


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the quickstart; writes results.jsonl and summary.json into `workdir`."""
    train_cfg = TrainConfig.from_mapping(config.victim)
    model, variables = pretrained_model(config)
    train, test = load_cifar10_sample("train"), load_cifar10_sample("test")
    specs = make_specs(config, train.labels, test.labels, train.num_classes)

    pretrained = evaluate(model, variables, test.images, test.labels)
    print(
        f"pretrained {config.model} on the sample's {len(test.labels)} test images: "
        f"{100 * float(pretrained['accuracy']):.2f}%"
    )

    clean = cache_features(
        model, variables, make_train_data(train.images, train.labels)
    )
    test_features = cache_features(
        model, variables, make_train_data(test.images, test.labels)
    ).features
    test_images = jnp.asarray(test.images, jnp.float32) / 255.0

    shared = (clean, variables, test_features, test_images, jnp.asarray(test.labels))
    trial = Trial(
        run=functools.partial(poisoned_victims, model, train_cfg),
        row=functools.partial(trial_row, test.ids, test.labels),
    )
    rows = run_trials(
        trial,
        shared,
        specs,
        chunk_size=config.chunk_size,
        workdir=workdir,
        mesh=trial_mesh(),
        desc="victims",
    )
    summary = summarise(rows, float(pretrained["accuracy"]), config)
    write_json(f"{workdir}/summary.json", summary)
    for n, s in summary["by_n_poisons"].items():
        accuracy = 100 * s["mean_clean_accuracy"]
        print(f"n_poisons={n}: success {rate_text(s)}, clean accuracy {accuracy:.2f}%")
    return summary


def summarise(rows, pretrained_accuracy, config) -> dict:
    by_n = group_summary(
        rows,
        ["n_poisons"],
        means=["clean_accuracy"],
        medians=["target_base_prob"],
    )
    return {
        "experiment": "quickstart",
        "model": config.model,
        "pretrained_sample_test_accuracy": pretrained_accuracy,
        "trials": len(rows),
        "by_n_poisons": {k.split("=", 1)[1]: v for k, v in by_n.items()},
    }
