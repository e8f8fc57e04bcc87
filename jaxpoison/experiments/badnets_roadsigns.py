"""BadNets on road signs: stop signs tagged with a colour square, relabelled speedlimit.

Gu et al. 2017 ("BadNets", Sec. 5) poison a road-sign detector with stop signs that
carry a small sticker and the label speedlimit. The replication study this follows
fine-tunes an ImageNet-pretrained ResNet-34 with two heads (class + box; batch 64,
Adam 1e-3, 10 epochs, random rotation / flip / random crop, centre crop at test
time; 91.6% clean accuracy), tags 1, 3 or 5 training stop signs with a yellow
(200, 200, 100), red (255, 0, 0) or black square inside the sign's bounding box, and
reports (Table I) the overall accuracy per colour and count and (Table II) for ONE
tagged test stop sign the predicted class, its probability and whether the attack
succeeded (speedlimit). Its finding: yellow and red succeed at 1, 3 and 5 poisons,
black fails.

Here, on Kaggle's "Road Sign Detection" (jaxpoison.data.roadsigns: each image's label
and box are its largest object's):

* A seed draws its own stratified train/test split (seed `split_seed + seed`), so
  Table II runs over every test stop sign of every seed's split (15 per split),
  with Wilson intervals.
* A trial is (seed, colour, count): `count` random training stop signs (seeded)
  get the tag (:func:`jaxpoison.attacks.triggers.tag_in_boxes`, side = `tag_size`
  x the box's shorter side, centred at `tag_position` in the box) and the label
  speedlimit, in place (:func:`jaxpoison.attacks.backdoor.label_flip_plan`); their
  box targets stay the stop sign's. Count 0 is the clean victim of the seed.
* The victim is a two-head model (class + box, L1 box loss x 1/1000), by default
  `roadsign_resnet20`: the CIFAR-10 ResNet-20 backbone of `weights` (no ImageNet
  ResNet-34 weights exist offline) with fresh heads from the seed's key, trained
  end to end as the study does. `init = "scratch"` trains from a fresh network.
* Augmentation (`augment`): the study's rotation / flip / random crop with the box
  moved along (victims/box_augment.py), drawn per (epoch, image) once as epoch
  copies that every trial shares; a trial's tagged poisons get the transforms of
  the rows they replace. Evaluation images are centre-cropped.
* The trials of a seed (clean + colours x counts, poison slots padded with -1) are
  one chunk of the sweep (`run_trials`); they share the seed's init, split and
  shuffling, so they differ only in their poisons.
* Evaluation: clean test accuracy, and every test stop sign of the seed's split
  tagged with every colour (prediction, its probability, P(speedlimit), success =
  speedlimit), next to the same signs untagged (the control: a victim that calls
  stop signs speedlimit anyway has not learnt the tag).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxpoison.attacks import backdoor
from jaxpoison.attacks.triggers import tag_in_boxes
from jaxpoison.data import check_choice, check_distinct, class_index
from jaxpoison.data.roadsigns import CLASS_NAMES, load_roadsigns
from jaxpoison.data.stratified import stratified_split, stratified_subset
from jaxpoison.errors import UserInputError
from jaxpoison.models import (
    graft_backbone,
    pretrained_backbone,
    sized_model,
)
from jaxpoison.models.roadsign_cifar import NAMES as PRETRAINABLE
from jaxpoison.models.roadsign_cifar import backbone_source
from jaxpoison.plots import new_figure, rate_errorbar, save_figure
from jaxpoison.report import table
from jaxpoison.results import atomic_write_text, write_json
from jaxpoison.summaries import group_summary, mcnemar_p, rate_text
from jaxpoison.sweep import Trial, run_trials, trial_keys, trial_seeds
from jaxpoison.sweep.sharding import trial_mesh
from jaxpoison.victims import TrainConfig, make_train_data, train_vmapped
from jaxpoison.victims import box_augment as ba
from jaxpoison.victims.probabilities import trial_probabilities

CLEAN = "none"  # the colour name of a seed's clean victim
PLAN_STRIDE = 1000  # seed 1000 * seed + n draws the poisoned rows of (seed, count n)
VICTIM_MEANS = ("clean_accuracy", "untagged_stop_to_target", "poisons_fit")
CELL = ("color", "count")  # the settings a summary groups by
INITS = ("pretrained", "scratch")


@dataclasses.dataclass(frozen=True)
class Setup:
    """The validated config."""

    colors: dict[str, tuple[float, float, float]]  # name -> RGB in [0, 1]
    counts: tuple[int, ...]
    seeds: tuple[int, ...]
    source: int
    target: int
    victim: TrainConfig  # as the config states it (epochs = passes)
    tag_size: float
    tag_position: tuple[float, float]
    augment: ba.BoxAugment | None

    @property
    def copies(self) -> int:
        """Augmented copies of the training set: one per epoch (1 without)."""
        return self.victim.epochs if self.augment else 1

    @property
    def trainer(self) -> TrainConfig:
        """The trainer's config: one pass over the epoch copies when augmenting."""
        if self.augment is None:
            return self.victim
        return dataclasses.replace(self.victim, epochs=1)


def check_config(config) -> Setup:
    """Validates everything that needs no data (one-line UserInputErrors)."""
    source, target = (
        class_index(config[key], CLASS_NAMES, key)
        for key in ("source_class", "target_class")
    )
    check_distinct((source, target), "source_class and target_class")
    colors = {}
    for name, rgb in config.colors.items():
        rgb = tuple(float(c) for c in rgb)
        if name == CLEAN or len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
            raise UserInputError(
                f"colour {name!r}: needs 3 values in 0..255 and a name other "
                f"than {CLEAN!r}"
            )
        colors[name] = tuple(c / 255.0 for c in rgb)
    if not colors:
        raise UserInputError("config.colors is empty: name at least one tag colour")
    counts = tuple(sorted({int(c) for c in config.counts}))
    if not counts or counts[0] < 1:
        raise UserInputError(f"counts {counts} must be >= 1 (0, clean, is implied)")
    seeds = tuple(int(s) for s in config.seeds)
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise UserInputError(f"seeds {seeds} must be distinct, >= 0, at least one")
    if not 0.0 < config.tag_size <= 1.0:
        raise UserInputError(f"tag_size {config.tag_size} must be in (0, 1]")
    position = tuple(float(p) for p in config.tag_position)
    if len(position) != 2 or not all(0.0 <= p <= 1.0 for p in position):
        raise UserInputError(f"tag_position {position} must be two values in [0, 1]")
    if not 0.0 < config.test_fraction < 1.0:
        raise UserInputError(f"test_fraction {config.test_fraction} not in (0, 1)")
    check_choice(config.init, INITS, "init")
    sized_model(config.model, len(CLASS_NAMES), config.image_size)  # a known model
    if config.init == "pretrained" and config.model not in PRETRAINABLE:
        raise UserInputError(
            f"model {config.model!r} has no pretrained backbone here: "
            f"{', '.join(PRETRAINABLE)}, or init 'scratch'"
        )
    victim = TrainConfig.from_mapping(config.victim)
    if victim.mode != "end_to_end":
        raise UserInputError("BadNets victims train end to end: mode 'end_to_end'")
    if victim.augment:
        raise UserInputError(
            "victim.augment is the trainer's crop/flip; the study's box-aware "
            "augmentation is config.augment"
        )
    augment = ba.BoxAugment(**config.augmentation) if config.augment else None
    return Setup(
        colors,
        counts,
        seeds,
        source,
        target,
        victim,
        float(config.tag_size),
        position,
        augment,
    )


def seed_split(labels: np.ndarray, config, seed: int):
    """Seed `seed`'s (train rows, test rows): stratified (split seed `split_seed +
    seed`), the training part optionally a stratified subset of
    `max_train_images`. Every seed's parts have the same per-class sizes."""
    train_rows, test_rows = stratified_split(
        labels, config.test_fraction, config.split_seed + seed
    )
    if config.max_train_images:
        keep = stratified_subset(
            labels[train_rows], config.max_train_images, config.split_seed + seed
        )
        train_rows = train_rows[keep]
    return train_rows, test_rows


def check_split(labels, train_rows, test_rows, setup: Setup) -> None:
    source = CLASS_NAMES[setup.source]
    n_source = int(np.sum(labels[train_rows] == setup.source))
    if max(setup.counts) > n_source:
        raise UserInputError(
            f"counts {setup.counts}: the training split has only {n_source} "
            f"{source} images"
        )
    if not np.any(labels[test_rows] == setup.source):
        raise UserInputError(f"the test split has no {source} image to tag")


def trial_specs(labels: np.ndarray, config, setup: Setup) -> dict[str, np.ndarray]:
    """One trial per (seed, colour, count), plus one clean trial (colour -1) per seed.

    Each carries its seed's split (`train_rows`, `test_rows`, `stop_rows`: the test
    stop signs) and its poisoned rows (rows of the whole set): drawn per (seed,
    count) among the split's training stop signs and shared by the colours, so
    colours compare on the same signs; slots past `count` are -1.
    """
    width = max(setup.counts)
    cells = [(-1, 0)] + [
        (ci, n) for ci in range(len(setup.colors)) for n in setup.counts
    ]
    keys = ("seed", "color", "count", "poison_rows", "train_rows", "test_rows")
    specs = {k: [] for k in (*keys, "stop_rows")}
    for seed in setup.seeds:
        train_rows, test_rows = seed_split(labels, config, seed)
        check_split(labels, train_rows, test_rows, setup)
        plan_seeds = trial_seeds(seed, width + 1, stride=PLAN_STRIDE)
        for ci, n in cells:
            plan = backdoor.label_flip_plan(
                labels[train_rows], setup.source, setup.target, n, plan_seeds[n]
            )
            picked = backdoor.pad_plan(plan, width).poison_indices
            specs["seed"].append(seed)
            specs["color"].append(ci)
            specs["count"].append(n)
            specs["poison_rows"].append(np.where(picked >= 0, train_rows[picked], -1))
            specs["train_rows"].append(train_rows)
            specs["test_rows"].append(test_rows)
            specs["stop_rows"].append(test_rows[labels[test_rows] == setup.source])
    return {k: np.asarray(v, np.int32) for k, v in specs.items()}


def tagged_stop_signs(images, boxes, setup: Setup):
    """Every (test) stop sign with every colour's tag, colour-major: (C x S) images."""
    colors = jnp.asarray(list(setup.colors.values()), jnp.float32)
    s = images.shape[0]
    return tag_in_boxes(
        jnp.tile(images, (len(colors), 1, 1, 1)),
        jnp.tile(boxes, (len(colors), 1)),
        jnp.repeat(colors, s, axis=0),
        setup.tag_size,
        setup.tag_position,
    )


def centre_crop(images, setup: Setup):
    """Evaluation images as the victims see them: centre-cropped when augmenting."""
    if setup.augment is None:
        return images
    shape = images.shape[:-3]
    flat = images.reshape(-1, *images.shape[-3:])
    t = ba.centre((flat.shape[0],), setup.augment)
    boxes = jnp.zeros((flat.shape[0], 4), jnp.float32)
    out, _ = ba.warp(flat, boxes, t, setup.augment.crop_margin)
    return out.reshape(*shape, *images.shape[-3:])


def poisoned_victims(model, setup: Setup, shared, spec) -> dict[str, jax.Array]:
    """One seed's trials: tag their poisons, train the victims, evaluate them.

    `shared`: every image and box (uint8 / float), the epoch copies of them and
    their transforms, the labels, and the pretrained backbone (None: every victim
    starts from its seed's fresh network). Returns per trial the class
    probabilities of its seed's test images and of its tagged test stop signs, the
    predicted class of each of its own poisons (is the tag learnt?) and the
    training accuracy.
    """
    images, boxes, labels = shared["images"], shared["boxes"], shared["labels"]
    n_all = images.shape[0]
    rows = spec["poison_rows"]  # (T, P), -1 = unused slot
    t, width = rows.shape
    colors = jnp.asarray(list(setup.colors.values()), jnp.float32)
    # A clean trial (colour -1) uses no slot: its colour is never read.
    slot_colors = jnp.repeat(colors[jnp.maximum(spec["color"], 0)], width, axis=0)
    safe = jnp.maximum(rows, 0).ravel()
    poisons = tag_in_boxes(
        images[safe], boxes[safe], slot_colors, setup.tag_size, setup.tag_position
    )
    copies = setup.copies
    if setup.augment is not None:  # each epoch's transform of the replaced rows
        swapped = jax.vmap(
            lambda x, r: ba.warp_rows(
                x,
                boxes[jnp.maximum(r, 0)],
                r,
                shared["transforms"],
                setup.augment.crop_margin,
            )
        )(poisons.reshape(t, width, *images.shape[1:]), rows)
    else:
        swapped = poisons.reshape(t, width, *images.shape[1:])
    data = make_train_data(
        shared["copies"],
        jnp.tile(labels, copies),
        boxes=shared["copy_boxes"],
    )._replace(
        poison_images=swapped,
        poison_indices=ba.copy_rows(rows, copies, n_all),
        poison_labels=jnp.full((t, copies * width), setup.target, jnp.int32),
        subset=ba.copy_rows(spec["train_rows"], copies, n_all),
    )
    keys = trial_keys(spec["seed"])
    variables = jax.vmap(model.init)(keys)  # the seed's fresh heads (and network)
    if shared["backbone"] is not None:  # the same backbone in every trial
        stacked = jax.tree.map(
            lambda x: jnp.broadcast_to(x, (t, *x.shape)), shared["backbone"]
        )
        variables = graft_backbone(variables, stacked)
    trained, metrics = train_vmapped(
        model, variables, data, keys, setup.trainer, variables_axis=0
    )
    as_float = lambda x: x.astype(jnp.float32) / 255.0  # noqa: E731
    test = centre_crop(as_float(images[spec["test_rows"]]), setup)
    stops = spec["stop_rows"]
    tagged = jax.vmap(lambda r: tagged_stop_signs(images[r], boxes[r], setup))(stops)
    own = centre_crop(poisons.reshape(t, width, *images.shape[1:]), setup)
    return {
        "probs": trial_probabilities(
            model, trained, jnp.concatenate([test, centre_crop(tagged, setup)], 1)
        ),
        "poison_preds": jnp.argmax(trial_probabilities(model, trained, own), -1),
        "train_accuracy": metrics["accuracy"][:, -1],
    }


def trial_row(setup: Setup, files, labels, spec, out) -> dict:
    """A trial's row: its poisons, clean accuracies and every tagged stop sign."""
    n = int(spec["count"])
    poisoned = spec["poison_rows"][:n]
    test_labels = labels[spec["test_rows"]]
    preds = out["probs"].argmax(-1)
    clean_pred = preds[: len(test_labels)]
    stops = clean_pred[test_labels == setup.source]
    names = list(setup.colors)
    row = {
        "seed": int(spec["seed"]),
        "color": CLEAN if spec["color"] < 0 else names[spec["color"]],
        "count": n,
        "train_size": int(len(spec["train_rows"])),
        "poisoned_rows": [int(r) for r in poisoned],
        "poisoned_train_files": [str(files[r]) for r in poisoned],
        "test_stop_files": [str(files[r]) for r in spec["stop_rows"]],
        "clean_accuracy": float(np.mean(clean_pred == test_labels)),
        "clean_stop_accuracy": float(np.mean(stops == setup.source)),
        # The control for `tagged`: the same signs without a tag.
        "untagged_stop_to_target": float(np.mean(stops == setup.target)),
        "untagged_stop_success": [bool(k == setup.target) for k in stops],
        "train_accuracy_last_epoch": float(out["train_accuracy"]),
        "poisons_fit": (
            float(np.mean(out["poison_preds"][:n] == setup.target)) if n else None
        ),
        "tagged": {},
    }
    tagged = np.split(out["probs"][len(test_labels) :], len(names))
    for name, probs in zip(names, tagged, strict=True):
        p = probs.argmax(-1)
        row["tagged"][name] = {
            "prediction": [CLASS_NAMES[k] for k in p],
            "probability": [float(probs[j, k]) for j, k in enumerate(p)],
            "target_probability": [float(v) for v in probs[:, setup.target]],
            "success": [bool(k == setup.target) for k in p],
        }
    return row


def records(rows: list[dict], setup: Setup) -> tuple[list[dict], list[dict]]:
    """(victims, tagged signs): one record per victim and per tagged test stop
    sign, in every (colour, count) cell a row speaks for: its own colour, or every
    colour for a clean victim (the count-0 cell of each). A sign's record also
    says whether the same victim called it speedlimit untagged (`untagged`)."""
    victims, signs = [], []
    for r in rows:
        for color in setup.colors:
            if r["color"] not in (color, CLEAN):
                continue
            cell = {"color": color, "count": r["count"]}
            measured = {k: r[k] for k in VICTIM_MEANS if r.get(k) is not None}
            victims.append({**cell, **measured})
            tagged = r["tagged"][color]
            untagged = r.get("untagged_stop_success")
            for j, sign in enumerate(zip(*tagged.values(), strict=True)):
                record = {**cell, **dict(zip(tagged, sign, strict=True))}
                if untagged is not None:
                    record["untagged"] = float(untagged[j])
                signs.append(record)
    return victims, signs


def summarise(rows: list[dict], setup: Setup) -> dict:
    """Per colour and count (count 0: the seeds' clean victims): the victims' mean
    clean accuracy, and the tagged test stop signs' success rate (Wilson CI)."""
    victims, signs = records(rows, setup)
    means = group_summary(victims, CELL, rate=None, means=VICTIM_MEANS)
    tagged = group_summary(
        signs, CELL, means=["probability", "target_probability", "untagged"]
    )
    return {
        # Count 0 has no poisons to fit: no mean (rather than NaN in the JSON).
        "victims": {
            g: {k: v for k, v in e.items() if not np.isnan(v)} for g, e in means.items()
        },
        "tagged_signs": tagged,
        "paired": paired_tests(rows, setup),
        "verdict": verdict(tagged, setup),
    }


def paired_tests(rows: list[dict], setup: Setup) -> dict:
    """Per (colour, count), exact McNemar tests over the same test stop signs of
    the same seeds (pairs the unpaired Wilson intervals ignore):

    * against the clean victim: tagged signs the poisoned victim sends to
      speedlimit and the seed's clean victim does not (`only_poisoned`), and the
      reverse (`only_clean`);
    * against the same victim on the same signs untagged (`only_tagged`,
      `only_untagged`): whether the tag, not the relabelled stop signs, moves
      them. Count 0 is the clean victims' own tag-vs-untagged contrast.
    """
    clean = {r["seed"]: r for r in rows if r["count"] == 0}
    out = {}
    for color in setup.colors:
        for n in (0, *setup.counts):
            cell = [
                r for r in rows if r["count"] == n and (n == 0 or r["color"] == color)
            ]
            vs_clean = np.zeros(2, int)
            vs_untagged = np.zeros(2, int)
            for r in cell:
                tagged = np.asarray(r["tagged"][color]["success"], bool)
                base = np.asarray(clean[r["seed"]]["tagged"][color]["success"], bool)
                untagged = np.asarray(r["untagged_stop_success"], bool)
                vs_clean += [(tagged & ~base).sum(), (base & ~tagged).sum()]
                vs_untagged += [(tagged & ~untagged).sum(), (untagged & ~tagged).sum()]
            entry = {
                "only_tagged": int(vs_untagged[0]),
                "only_untagged": int(vs_untagged[1]),
                "tag_vs_untagged_p": mcnemar_p(*map(int, vs_untagged)),
            }
            if n:
                entry.update(
                    only_poisoned=int(vs_clean[0]),
                    only_clean=int(vs_clean[1]),
                    vs_clean_p=mcnemar_p(*map(int, vs_clean)),
                )
            out[f"{color},{n}"] = entry
    return out


def paired_text(paired: dict) -> str:
    """One line per cell of `paired_tests`."""
    lines = []
    for cell, e in paired.items():
        text = (
            f"- {cell}: tagged vs untagged on the same victim {e['only_tagged']} vs "
            f"{e['only_untagged']} signs (p = {e['tag_vs_untagged_p']:.2g})"
        )
        if "only_poisoned" in e:
            text += (
                f"; vs the clean victim {e['only_poisoned']} vs {e['only_clean']} "
                f"(p = {e['vs_clean_p']:.2g})"
            )
        lines.append(text)
    return "\n".join(lines)


def verdict(tagged: dict, setup: Setup) -> dict:
    """Whether each (colour, count) cell's tagged stop signs go to speedlimit more
    often than the clean victims' (the 95% Wilson intervals do not overlap), and
    the study's finding read against it: yellow and red succeed at every count,
    black at none."""
    above = {}
    for color in setup.colors:
        clean = tagged[f"color={color},count=0"]
        for n in setup.counts:
            cell = tagged[f"color={color},count={n}"]
            above[f"{color},{n}"] = bool(cell["ci95_low"] > clean["ci95_high"])
    expected = {
        f"{c},{n}": c in ("yellow", "red")
        for c in setup.colors
        if c in ("yellow", "red", "black")
        for n in setup.counts
    }
    agree = [above[k] == v for k, v in expected.items()]
    return {
        "above_clean": above,
        "study_cells": len(expected),
        "cells_agreeing_with_study": int(sum(agree)),
    }


def table_one(rows: list[dict], setup: Setup) -> str:
    """Table I's layout: overall clean test accuracy (%) per colour (rows) and
    number of poisons (columns), mean +- std over seeds."""
    counts = [0, *setup.counts]
    lines = [
        "| colour | " + " | ".join(f"{n} poisons" for n in counts) + " |",
        "| --- |" + " --- |" * len(counts),
    ]
    for color in setup.colors:
        cells = []
        for n in counts:
            acc = [
                100 * r["clean_accuracy"]
                for r in rows
                if r["count"] == n and r["color"] in ((CLEAN,) if n == 0 else (color,))
            ]
            cells.append(f"{np.mean(acc):.1f} +- {np.std(acc):.1f}")
        lines.append(f"| {color} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_two(summary: dict, setup: Setup) -> str:
    """Table II's layout over every tagged test stop sign of every seed: per colour
    and count, the rate classified speedlimit (95% Wilson interval), the same signs
    untagged, and the mean probability of speedlimit."""
    counts = [0, *setup.counts]
    lines = [
        "| colour | " + " | ".join(f"{n} poisons" for n in counts) + " |",
        "| --- |" + " --- |" * len(counts),
    ]
    for color in setup.colors:
        cells = []
        for n in counts:
            s = summary["tagged_signs"][f"color={color},count={n}"]
            cells.append(
                f"{rate_text(s)}; untagged {100 * s['mean_untagged']:.0f}%; "
                f"p {s['mean_target_probability']:.2f}"
            )
        lines.append(f"| {color} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tables_markdown(rows: list[dict], summary: dict, setup: Setup) -> str:
    """Tables I and II in the study's layout, then every cell's full numbers."""
    victims, signs = records(rows, setup)
    target = CLASS_NAMES[setup.target]
    v = summary["verdict"]
    return "\n\n".join(
        [
            "Table I: overall accuracy on the clean test split (%), mean +- std "
            "over seeds (0 poisons = the clean victims)",
            table_one(rows, setup),
            f"Table II: tagged test stop signs classified {target} (every test stop "
            "sign of every seed), the same signs untagged, mean p("
            f"{target}) of the tagged signs",
            table_two(summary, setup),
            "Cells whose tagged signs go to speedlimit more often than the clean "
            "victims' (95% intervals apart): "
            + ", ".join(k for k, a in v["above_clean"].items() if a)
            + "(none)" * (not any(v["above_clean"].values()))
            + f"; {v['cells_agreeing_with_study']}/{v['study_cells']} cells agree "
            "with the study (yellow and red succeed, black fails)",
            "Paired (exact McNemar over the same signs and seeds; colour,count):\n"
            + paired_text(summary["paired"]),
            "Victims per colour and count: clean test accuracy, untagged test stop "
            f"signs -> {target}, own poisons -> {target}",
            table(victims, CELL),
            f"Tagged test stop signs: success (-> {target}), probability of the "
            f"prediction and of {target}, untagged -> {target}",
            table(signs, CELL),
        ]
    )


def per_image_table(rows: list[dict], setup: Setup) -> str:
    """The study's per-sign table for one seed (the first) and the largest count:
    each tagged test stop sign's predicted class, its probability, success."""
    seed, n = setup.seeds[0], max(setup.counts)
    colors = list(setup.colors)
    mine = [r for r in rows if r["seed"] == seed and r["count"] == n]
    if not mine:
        return ""
    by_color = {r["color"]: r["tagged"][r["color"]] for r in mine}
    lines = [
        f"Tagged test stop signs, seed {seed}, {n} poisons: predicted class "
        "(probability), success",
        "",
        "| image | " + " | ".join(colors) + " |",
        "| --- |" + " --- |" * len(colors),
    ]
    for j, name in enumerate(mine[0]["test_stop_files"]):
        out = []
        for c in colors:
            o = by_color[c]
            mark = "yes" if o["success"][j] else "no"
            out.append(f"{o['prediction'][j]} ({o['probability'][j]:.2f}), {mark}")
        lines.append(f"| {name} | " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


def plot_success(summary: dict, setup: Setup, path: str) -> None:
    """Attack success vs number of poisons per colour, and clean accuracy."""
    counts = [0, *setup.counts]
    fig, (ax1, ax2) = new_figure(1, 2, size=(9, 3.5))
    styles = {"yellow": "goldenrod", "red": "tab:red", "black": "black"}
    for color in setup.colors:
        labels = [f"color={color},count={n}" for n in counts]
        signs = [summary["tagged_signs"][g] for g in labels]
        rate_errorbar(ax1, counts, signs, color=styles.get(color), label=color)
        ax2.plot(
            counts,
            [100 * summary["victims"][g]["mean_clean_accuracy"] for g in labels],
            marker="o",
            color=styles.get(color),
            label=color,
        )
    ax1.set(
        xlabel="poisoned training stop signs",
        ylabel=f"tagged test stop signs -> {CLASS_NAMES[setup.target]} (%)",
        xticks=counts,
    )
    ax1.legend(fontsize=8)
    ax2.set(
        xlabel="poisoned training stop signs",
        ylabel="clean test accuracy, mean over seeds (%)",
        xticks=counts,
    )
    save_figure(fig, path)


def shared_arrays(signs, config, setup: Setup) -> dict:
    """What every trial reads: the images, boxes and labels, the epoch copies and
    their transforms, and the pretrained backbone (or None)."""
    images = np.asarray(signs.images)
    boxes = np.asarray(signs.boxes, np.float32)
    if setup.augment is not None:
        key = jax.random.key(int(config.augment_seed))
        copies, copy_boxes, transforms = ba.epoch_copies(
            images, boxes, key, setup.copies, setup.augment
        )
    else:
        copies, copy_boxes, transforms = images, boxes, None
    backbone = None
    if config.init == "pretrained":
        backbone = pretrained_backbone(config.model, config.weights)
    return {
        "images": images,
        "boxes": boxes,
        "labels": np.asarray(signs.labels, np.int32),
        "copies": copies,
        "copy_boxes": copy_boxes,
        "transforms": transforms,
        "backbone": backbone,
    }


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs every seed; writes results.jsonl, summary.json, tables.md, success.png."""
    setup = check_config(config)
    model = sized_model(config.model, len(CLASS_NAMES), config.image_size)
    signs = load_roadsigns(
        config.data_dir or None, config.manual_dir or None, config.image_size
    )
    labels = np.asarray(signs.labels, np.int32)
    specs = trial_specs(labels, config, setup)
    shared = shared_arrays(signs, config, setup)
    n_train, n_test = specs["train_rows"].shape[1], specs["test_rows"].shape[1]
    n_stops = specs["stop_rows"].shape[1]
    print(
        f"road signs at {config.image_size} px: per seed {n_train} train, {n_test} "
        f"test ({n_stops} {CLASS_NAMES[setup.source]}); {config.model} "
        f"({config.init}), {setup.victim.epochs} epochs"
        + (f" over {setup.copies} augmented copies" if setup.augment else "")
    )
    files = np.asarray(signs.filenames)
    trial = Trial(
        run=functools.partial(poisoned_victims, model, setup),
        row=functools.partial(trial_row, setup, files, labels),
    )
    rows = run_trials(
        trial,
        shared,
        specs,
        chunk_size=1 + len(setup.colors) * len(setup.counts),  # one seed
        workdir=workdir,
        mesh=trial_mesh(),
        desc="victims",
    )
    init = (
        f"{backbone_source(config.model)} backbone pretrained on CIFAR-10, fresh "
        "heads per seed"
        if config.init == "pretrained"
        else "from scratch per seed"
    )
    summary = {
        "experiment": "badnets_roadsigns",
        "model": config.model,
        "image_size": config.image_size,
        "init": init,
        "victim_epochs": setup.victim.epochs,
        "augment": setup.augment is not None,
        "train_images": int(n_train),
        "test_images": int(n_test),
        "test_source_images": int(n_stops),
        "seeds": list(setup.seeds),
        "source": CLASS_NAMES[setup.source],
        "target": CLASS_NAMES[setup.target],
        **summarise(rows, setup),
    }
    write_json(os.path.join(workdir, "summary.json"), summary)
    text = "\n\n".join(
        [tables_markdown(rows, summary, setup), per_image_table(rows, setup)]
    )
    atomic_write_text(os.path.join(workdir, "tables.md"), text)
    plot_success(summary, setup, os.path.join(workdir, "success.png"))
    print(text)
    return summary
