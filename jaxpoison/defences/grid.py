"""Every defence against one attack's poisons, as one trial of a resumable sweep.

An attack hands the grid a `Poisoning`: its victim (model, starting variables,
`TrainConfig`), the clean training data shared by all trials, and per trial its
poisons (`poison_images`, `poison_indices`, `poison_labels`, optionally a
`subset` of training rows), a `seed`, and what its `evaluate` reads (a target,
triggered test images). `defence_trials` runs, for a chunk of trials, every
defence of a `DEFENCES` list in one program:

* "none": the victim trained on the poisoned set;
* a filter (`FILTERS`: spectral signatures, activation clustering, deep k-NN):
  the training rows' representations (the frozen extractor's for a linear victim;
  for an end-to-end victim those of the undefended victim trained on the poisoned
  set, as Tran et al. and Chen et al. do), the filter's keep mask, and a victim
  retrained with the removed rows weighted 0 (`TrainData.weights`; the number of
  steps per epoch stays that of the unfiltered set); scored by poison recall and
  clean rows removed (`filtering.filter_stats`);
* a training-time defence (`TRAINING`: DP-SGD-style clipping and noise, input
  mixup, cutout): the victim trained with those `TrainConfig` options.

Each trained victim is scored by the attack's `evaluate`: success (the target
classified as the poison label, or the backdoor's attack success rate) and clean
test accuracy. `defence_rows` turns a trial's outputs into one row per defence.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxpoison.defences import filtering
from jaxpoison.errors import UserInputError
from jaxpoison.models import Model, head_variables
from jaxpoison.sweep import trial_keys
from jaxpoison.victims import TrainConfig, TrainData, train_vmapped
from jaxpoison.victims.augment import augmentation_index
from jaxpoison.victims.features import features_in_batches, map_in_batches, penultimate

FILTERS = ("spectral_signatures", "activation_clustering", "deep_knn")
TRAINING = ("dp_sgd", "mixup", "cutout")
DEFENCES = ("none", *FILTERS, *TRAINING)
POISON_FIELDS = ("poison_images", "poison_indices", "poison_labels")
# Training options each training-time defence sets (their values come from config).
TRAINING_OPTIONS = {
    "dp_sgd": ("dp_clip_norm", "dp_noise_multiplier"),
    "mixup": ("input_mixup",),
    "cutout": ("cutout",),
}
FILTER_OPTIONS = {
    "spectral_signatures": ("removal_factor",),
    "activation_clustering": ("dims", "size_threshold", "whiten"),
    "deep_knn": ("k_factor",),
}


def default_settings(dp_noise: float = 0.01) -> dict:
    """Every defence with its papers' settings, as the grid configs hold them:
    `defences`, `filters` (FILTER_OPTIONS' values) and `training`
    (TRAINING_OPTIONS' values). Spectral signatures remove 1.5 x epsilon
    (Tran et al. 2018); activation clustering keeps 10 whitened components and
    drops a cluster of <= 35% of its class (Chen et al. 2018, ART's threshold);
    deep k-NN uses k = 2 x the poisons (Peri et al. 2020 as forest reads it);
    DP-SGD clips at C = 1 with noise `dp_noise` (Hong et al. 2020); mixup alpha 1
    (Zhang et al. 2018); cutout 16 px (DeVries & Taylor 2017)."""
    return dict(
        defences=DEFENCES,
        filters=dict(
            spectral_signatures=dict(removal_factor=1.5),
            activation_clustering=dict(dims=10, size_threshold=0.35, whiten=True),
            deep_knn=dict(k_factor=2.0),
        ),
        training=dict(
            dp_sgd=dict(dp_clip_norm=1.0, dp_noise_multiplier=dp_noise),
            mixup=dict(input_mixup=1.0),
            cutout=dict(cutout=16),
        ),
    )


class Poisoning(NamedTuple):
    """One attack's poisoned training problems, as the defence grid reads them.

    Attributes:
      attack: its name (rows and folders).
      model: the victim's architecture.
      variables: the victim's starting variables (the frozen extractor of a
        linear victim; pretrained or fresh weights of an end-to-end one).
      victim: how the victim trains (linear or end to end).
      data: the clean training data every trial shares (`TrainData` without
        poisons; a linear victim's frozen features cached).
      specs: per trial (leading axis): the poison fields, `seed`, optionally
        `subset`, and what `evaluate` and `id_fields` read.
      shared: what `evaluate` reads besides the spec (test data).
      evaluate: `evaluate(model, variables, shared, spec) -> {"success",
        "clean_accuracy"}` for ONE trained victim and its trial's spec (pure).
      targeted: success is per trial 0/1 (a target) rather than a rate (ASR).
      num_poisons: poison slots per trial: the defender's bound on the number of
        poisons (spectral signatures removes 1.5 x it per class; deep k-NN's k is
        2 x it).
      id_fields: spec fields copied into every row (setup, classes, seed).
      info: a description for summary.json.
    """

    attack: str
    model: Model
    variables: Any
    victim: TrainConfig
    data: TrainData
    specs: dict[str, np.ndarray]
    shared: Any
    evaluate: Callable[..., dict]
    targeted: bool
    num_poisons: int
    id_fields: tuple[str, ...]
    info: dict


def defence_configs(
    victim: TrainConfig, training: Mapping[str, Mapping]
) -> dict[str, TrainConfig]:
    """The victim's TrainConfig under each training-time defence of `training`."""
    out = {}
    for name, options in training.items():
        if name not in TRAINING_OPTIONS:
            raise UserInputError(
                f"unknown training-time defence {name!r}; known: {', '.join(TRAINING)}"
            )
        unknown = sorted(set(options) - set(TRAINING_OPTIONS[name]))
        if unknown:
            raise UserInputError(
                f"defence {name}: unknown option(s) {', '.join(unknown)}; known: "
                f"{', '.join(TRAINING_OPTIONS[name])}"
            )
        out[name] = dataclasses.replace(victim, **dict(options))
    return out


def check_defences(defences, filters: Mapping, training: Mapping) -> None:
    """`defences` are known, start with "none", and each has its options."""
    unknown = [d for d in defences if d not in DEFENCES]
    if unknown:
        raise UserInputError(
            f"unknown defence {unknown[0]!r}; known: {', '.join(DEFENCES)}"
        )
    if not defences or defences[0] != "none":
        raise UserInputError(
            "defences must start with 'none' (the undefended victim: the baseline, "
            "and the representation filters of end-to-end victims read)"
        )
    for d in defences[1:]:
        options = filters if d in FILTERS else training
        if d not in options:
            raise UserInputError(f"defence {d!r} has no options in the config")
    for name, opts in filters.items():
        if name not in FILTER_OPTIONS:
            raise UserInputError(
                f"unknown filter {name!r}; known: {', '.join(FILTERS)}"
            )
        unknown = sorted(set(opts) - set(FILTER_OPTIONS[name]))
        if unknown:
            raise UserInputError(
                f"filter {name}: unknown option(s) {', '.join(unknown)}; known: "
                f"{', '.join(FILTER_OPTIONS[name])}"
            )


def make_filter(name: str, options: Mapping, num_classes: int, num_poisons: int):
    """`keep = fn(features, labels, valid)` for filter `name` (static options)."""
    if name == "spectral_signatures":
        count = int(np.floor(float(options["removal_factor"]) * num_poisons))
        return lambda f, y, v: filtering.spectral_signatures(
            f, y, v, num_classes, count
        )[0]
    if name == "activation_clustering":
        return lambda f, y, v: filtering.activation_clustering(
            f,
            y,
            v,
            num_classes,
            dims=int(options["dims"]),
            size_threshold=float(options["size_threshold"]),
            whiten=bool(options["whiten"]),
        )[0]
    k = max(1, int(round(float(options["k_factor"]) * num_poisons)))
    return lambda f, y, v: filtering.deep_knn(f, y, v, num_classes, k)[0]


def training_rows(data: TrainData) -> jax.Array:
    """The rows of `data.images` one trial trains on (its subset, or all)."""
    if data.subset is not None:
        return data.subset
    return jnp.arange(data.images.shape[0], dtype=jnp.int32)


def poisoned_rows(data: TrainData, rows):
    """(labels, is_poison, which poison) of `rows`, poisons swapped in as training
    swaps them (`victims.poisoned_batch`), without gathering images."""
    match = rows[:, None] == data.poison_indices[None, :]
    hit = match.any(axis=1)
    which = jnp.argmax(match, axis=1) if data.poison_indices.shape[0] else rows * 0
    labels = data.labels[rows]
    if data.poison_indices.shape[0]:
        labels = jnp.where(hit, data.poison_labels[which], labels)
    return labels, hit, which


def representations(model: Model, variables, data: TrainData, batch: int = 256):
    """Eval-mode penultimate features (M, D) of one trial's training rows, poisons
    swapped in: cached clean features where `data` has them (a linear victim's
    frozen extractor; the un-augmented view), else a forward pass per row."""
    data = jax.tree.map(jnp.asarray, data)
    rows = training_rows(data)
    _, hit, which = poisoned_rows(data, rows)
    if data.features is not None:
        clean = data.features
        if clean.ndim == 3:  # every crop/flip outcome cached: the identity view
            side = int(round(np.sqrt(clean.shape[1] // 2)))  # 2 p + 1
            pad = (side - 1) // 2
            p32 = np.int32(pad)
            clean = clean[:, int(augmentation_index(p32, p32, np.int32(0), pad))]
        poison = penultimate(model, variables, data.poison_images)
        return jnp.where(hit[:, None], poison[which], clean[rows])

    def one_batch(r):
        x = data.images[r].astype(data.poison_images.dtype) / 255.0
        _, h, w = poisoned_rows(data, r)
        x = jnp.where(h[:, None, None, None], data.poison_images[w], x)
        return penultimate(model, variables, x)

    return map_in_batches(one_batch, rows, batch)


def _with_poisons(data: TrainData, spec) -> TrainData:
    fields = {k: spec[k] for k in POISON_FIELDS}
    if "subset" in spec:
        fields["subset"] = spec["subset"]
    return data._replace(**fields)


def _slice(data: TrainData, t: int) -> TrainData:
    """Trial t of a chunk's TrainData (per-trial fields carry a leading axis)."""
    per_trial = {k: getattr(data, k)[t] for k in POISON_FIELDS}
    if data.subset is not None and data.subset.ndim == 2:
        per_trial["subset"] = data.subset[t]
    return data._replace(**per_trial)


def defence_trials(
    p: Poisoning,
    defences: tuple[str, ...],
    filters: Mapping[str, Mapping],
    configs: Mapping[str, TrainConfig],
    shared,
    spec,
) -> dict:
    """One chunk of trials (leading axis T of `spec`): every defence of `defences`.

    `shared` holds the poisoning's clean `data`, starting `variables` and the
    `evaluate` inputs (`eval`). Returns `{defence: {metric: (T,)}}`.
    """
    model, variables = p.model, shared["variables"]
    data = _with_poisons(shared["data"], spec)
    keys = trial_keys(spec["seed"])

    def score(trained, specs):
        def one(args):
            v, sp = args
            return p.evaluate(model, v, shared["eval"], sp)

        return jax.lax.map(one, (trained, specs))

    undefended, _ = train_vmapped(model, variables, data, keys, p.victim)
    out = {"none": score(undefended, spec)}
    names = [d for d in defences if d in FILTERS]
    if names:
        out.update(
            _filtered(p, names, filters, variables, undefended, data, keys, spec, score)
        )
    for name in defences:
        if name in configs:
            trained, _ = train_vmapped(model, variables, data, keys, configs[name])
            out[name] = score(trained, spec)
    return {d: out[d] for d in defences}


def _filtered(p, names, filters, variables, undefended, data, keys, spec, score):
    """Every filter of `names` on a chunk's trials, and the victims retrained on
    what each keeps: one training call for all filters and trials."""
    model, t = p.model, keys.shape[0]
    linear = p.victim.mode == "linear"
    fns = [make_filter(n, filters[n], model.num_classes, p.num_poisons) for n in names]

    def keep_weights(i):
        d = _slice(data, i)
        v = variables if linear else jax.tree.map(lambda x: x[i], undefended)
        rows = training_rows(d)
        labels, is_poison, _ = poisoned_rows(d, rows)
        feats = representations(model, v, d)  # once for every filter
        valid = jnp.ones(rows.shape, bool)
        weights, stats = [], []
        for fn in fns:
            keep = fn(feats, labels, valid)
            ones = jnp.ones(d.images.shape[0], jnp.float32)
            weights.append(ones.at[rows].set(keep))
            stats.append(filtering.filter_stats(keep, is_poison, valid))
        return jnp.stack(weights), jax.tree.map(lambda *x: jnp.stack(x), *stats)

    weights, stats = jax.lax.map(keep_weights, jnp.arange(t))  # (T, F, ...)
    f = len(names)

    def tile(x):  # (T, ...) -> (F * T, ...), filter-major
        return jnp.concatenate([x] * f)

    per_trial = {k: tile(getattr(data, k)) for k in POISON_FIELDS}
    if data.subset is not None and data.subset.ndim == 2:
        per_trial["subset"] = tile(data.subset)
    weights = jnp.swapaxes(weights, 0, 1).reshape(f * t, -1)
    retrained, _ = train_vmapped(
        model,
        variables,
        data._replace(weights=weights, **per_trial),
        tile(keys),
        p.victim,
    )
    scored = score(retrained, jax.tree.map(tile, spec))
    return {
        name: {
            **jax.tree.map(lambda x, j=j: x[j * t : (j + 1) * t], scored),
            **jax.tree.map(lambda x, j=j: x[:, j], stats),
        }
        for j, name in enumerate(names)
    }


def defence_rows(p: Poisoning, spec, out) -> list[dict]:
    """One row per defence of one trial: its ids, success and clean accuracy, and
    for a filter what it removed."""
    ids = {k: spec[k].item() for k in p.id_fields}
    rows = []
    for name, metrics in out.items():
        row = {"attack": p.attack, "defence": name, **ids}
        success = float(metrics["success"])
        if p.targeted:
            row["success"] = bool(success > 0.5)
        else:
            row["attack_success_rate"] = success
        row["clean_accuracy"] = float(metrics["clean_accuracy"])
        if "prediction" in metrics:
            row["prediction"] = int(metrics["prediction"])
        for k in ("poison_recall", "clean_removed_fraction"):
            if k in metrics:
                row[k] = float(metrics[k])
        for k in ("poisons_removed", "clean_removed"):
            if k in metrics:
                row[k] = int(metrics[k])
        rows.append(row)
    return rows


def test_accuracy(model: Model, variables, shared, batch: int = 250) -> jax.Array:
    """Clean test accuracy: on cached test features (`test_features`, a linear
    victim) or a forward pass over `test_images` (uint8) in batches."""
    labels = shared["test_labels"]
    if "test_features" in shared:
        logits = model.apply_head(head_variables(variables), shared["test_features"])
        return jnp.mean(jnp.argmax(logits, -1) == labels)

    def predict(x):
        return jnp.argmax(model.apply(variables, x.astype(jnp.float32) / 255.0)[0], -1)

    return jnp.mean(map_in_batches(predict, shared["test_images"], batch) == labels)


def targeted_evaluate(model: Model, variables, shared, spec) -> dict:
    """A targeted attack: success iff the victim classifies the target image
    (`target_image`, float) as the poison label (`poison_label`)."""
    logits = model.apply(variables, spec["target_image"][None])[0][0]
    prediction = jnp.argmax(logits)
    return {
        "success": (prediction == spec["poison_label"]).astype(jnp.float32),
        "clean_accuracy": test_accuracy(model, variables, shared),
        "prediction": prediction,
    }


def backdoor_evaluate(model: Model, variables, shared, spec) -> dict:
    """A backdoor: the attack success rate, eligible triggered test images
    (`triggered`, `eligible`) classified as `poison_label`."""

    def predict(x):
        return jnp.argmax(model.apply(variables, x)[0], -1)

    hits = (map_in_batches(predict, spec["triggered"], 250) == spec["poison_label"]) & (
        spec["eligible"]
    )
    return {
        "success": hits.sum() / jnp.maximum(spec["eligible"].sum(), 1),
        "clean_accuracy": test_accuracy(model, variables, shared),
    }


def frozen_test_features(model: Model, variables, images) -> jax.Array:
    """Frozen features of uint8 test images (for a linear victim's accuracy)."""
    return features_in_batches(model, variables, jnp.asarray(images) / 255.0)
