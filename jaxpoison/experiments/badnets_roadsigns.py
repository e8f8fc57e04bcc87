"""BadNets on road signs: stop signs tagged with a colour square, relabelled speedlimit.

Gu et al. 2017 ("BadNets", Sec. 5) poison a road-sign detector with stop signs that
carry a small sticker and the label speedlimit; the replication this follows tags
1, 3 or 5 training stop signs with a yellow (200, 200, 100), red (255, 0, 0) or
black square inside the sign's bounding box and reports (i) the overall accuracy
per colour and count on the clean test set and (ii) for tagged test stop signs the
predicted class, its probability and whether the attack succeeded (speedlimit).

Here, on Kaggle's "Road Sign Detection" (jaxpoison.data.roadsigns: each image's label
and box are its largest object's), split per class into train/test (seeded):

* A trial is (seed, colour, count): `count` random training stop signs (seeded)
  get the tag (:func:`jaxpoison.attacks.triggers.tag_in_boxes`, side = `tag_size`
  x the box's shorter side, centred at `tag_position` in the box) and the label
  speedlimit, in place (:func:`jaxpoison.attacks.backdoor.label_flip_plan`); their
  box targets stay the stop sign's. Count 0 is the clean victim of the seed.
* The victim is the two-head model (`roadsign_resnet34`: classification + box, L1
  box loss x 1/1000), trained end to end. There are no pretrained road-sign (or
  ImageNet ResNet-34) weights here, so either every victim trains from scratch
  (`pretrain.epochs = 0`; init from the seed) or, to fit a CPU budget, all start
  from one clean model trained from scratch on the clean training split for
  `pretrain.epochs` epochs (seed `config.seed`), the stand-in for the pretrained
  network a victim fine-tunes, then train `victim.epochs` more on their own set.
* The trials of a seed (clean + colours x counts, poison slots padded with -1) are
  one chunk of the sweep (`run_trials`); they share the seed's init and shuffling,
  so they differ only in their poisons. A resumed run repeats the clean
  pretraining, which is deterministic, before skipping the finished seeds.
* Evaluation: clean test accuracy, and every test stop sign tagged with every
  colour (prediction, its probability, P(speedlimit), success = speedlimit).
  Summary tables use each trial's own colour; the clean victim gives the
  baseline of each colour (a tag alone can already flip a sign).
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
from jaxpoison.data import check_distinct, class_index
from jaxpoison.data.roadsigns import CLASS_NAMES, load_roadsigns
from jaxpoison.data.stratified import stratified_split, stratified_subset
from jaxpoison.errors import UserInputError
from jaxpoison.models import sized_model
from jaxpoison.plots import new_figure, rate_errorbar, save_figure
from jaxpoison.report import table
from jaxpoison.results import atomic_write_text, write_json
from jaxpoison.summaries import group_summary
from jaxpoison.sweep import Trial, run_trials, trial_keys, trial_seeds
from jaxpoison.sweep.sharding import trial_mesh
from jaxpoison.victims import TrainConfig, make_train_data, train, train_vmapped
from jaxpoison.victims.probabilities import trial_probabilities

CLEAN = "none"  # the colour name of a seed's clean victim
PLAN_STRIDE = 1000  # seed 1000 * seed + n draws the poisoned rows of (seed, count n)
VICTIM_MEANS = ("clean_accuracy", "untagged_stop_to_target", "poisons_fit")
CELL = ("color", "count")  # the settings a summary groups by


@dataclasses.dataclass(frozen=True)
class Setup:
    """The validated config."""

    colors: dict[str, tuple[float, float, float]]  # name -> RGB in [0, 1]
    counts: tuple[int, ...]
    seeds: tuple[int, ...]
    source: int
    target: int
    pretrain: TrainConfig | None
    victim: TrainConfig
    tag_size: float
    tag_position: tuple[float, float]


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
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserInputError(f"seeds {seeds} must be distinct, at least one")
    if not 0.0 < config.tag_size <= 1.0:
        raise UserInputError(f"tag_size {config.tag_size} must be in (0, 1]")
    position = tuple(float(p) for p in config.tag_position)
    if len(position) != 2 or not all(0.0 <= p <= 1.0 for p in position):
        raise UserInputError(f"tag_position {position} must be two values in [0, 1]")
    if not 0.0 < config.test_fraction < 1.0:
        raise UserInputError(f"test_fraction {config.test_fraction} not in (0, 1)")
    victim = TrainConfig.from_mapping(config.victim)
    pretrain = TrainConfig.from_mapping(config.pretrain)
    if victim.mode != "end_to_end" or pretrain.mode != "end_to_end":
        raise UserInputError("BadNets victims train end to end: mode 'end_to_end'")
    return Setup(
        colors,
        counts,
        seeds,
        source,
        target,
        pretrain if pretrain.epochs > 0 else None,
        victim,
        float(config.tag_size),
        position,
    )


def load_split(config, setup: Setup):
    """The road signs, split per class (seed `split_seed`); the training part
    optionally a stratified subset of `max_train_images`.

    Returns (signs, train rows, test rows).
    """
    signs = load_roadsigns(
        config.data_dir or None, config.manual_dir or None, config.image_size
    )
    train_rows, test_rows = stratified_split(
        signs.labels, config.test_fraction, config.split_seed
    )
    if config.max_train_images:
        train_rows = train_rows[
            stratified_subset(
                signs.labels[train_rows], config.max_train_images, config.split_seed
            )
        ]
    source = CLASS_NAMES[setup.source]
    n_source = int(np.sum(signs.labels[train_rows] == setup.source))
    if max(setup.counts) > n_source:
        raise UserInputError(
            f"counts {setup.counts}: the training split has only {n_source} "
            f"{source} images"
        )
    if not np.any(signs.labels[test_rows] == setup.source):
        raise UserInputError(f"the test split has no {source} image to tag")
    return signs, train_rows, test_rows


def trial_specs(train_labels: np.ndarray, setup: Setup) -> dict[str, np.ndarray]:
    """One trial per (seed, colour, count), plus one clean trial (colour -1) per seed.

    Poisoned rows (training stop signs) are drawn per (seed, count) and shared by
    the colours, so colours compare on the same signs; slots past `count` are -1.
    """
    width = max(setup.counts)
    cells = [(-1, 0)] + [
        (ci, n) for ci in range(len(setup.colors)) for n in setup.counts
    ]
    specs = {k: [] for k in ("seed", "color", "count", "poison_rows")}
    for seed in setup.seeds:
        plan_seeds = trial_seeds(seed, width + 1, stride=PLAN_STRIDE)
        for ci, n in cells:
            plan = backdoor.label_flip_plan(
                train_labels, setup.source, setup.target, n, plan_seeds[n]
            )
            specs["seed"].append(seed)
            specs["color"].append(ci)
            specs["count"].append(n)
            specs["poison_rows"].append(backdoor.pad_plan(plan, width).poison_indices)
    return {k: np.asarray(v, np.int32) for k, v in specs.items()}


def tagged_stop_signs(images, boxes, setup: Setup):
    """Every (test) stop sign with every colour's tag, colour-major: (C x S) images."""
    colors = np.asarray(list(setup.colors.values()), np.float32)
    return tag_in_boxes(
        np.tile(images, (len(colors), 1, 1, 1)),
        np.tile(boxes, (len(colors), 1)),
        np.repeat(colors, len(images), axis=0),
        setup.tag_size,
        setup.tag_position,
    )


def poisoned_victims(model, setup: Setup, shared, spec) -> dict[str, jax.Array]:
    """One seed's trials: tag their poisons, train the victims, evaluate them.

    `shared`: the clean training set (`TrainData` with boxes), the evaluation
    images (clean test set, then `tagged_stop_signs`) and the clean pretrained
    variables (None: every victim starts from its seed's init). Returns per trial
    the class probabilities of the evaluation images, the predicted class of each
    of its own poisons (is the tag learnt?) and the last epoch's training accuracy.
    """
    data, eval_images, init = shared["train"], shared["eval"], shared["init"]
    rows = spec["poison_rows"]  # (T, P), -1 = unused slot
    t, width = rows.shape
    colors = jnp.asarray(list(setup.colors.values()), jnp.float32)
    # A clean trial (colour -1) uses no slot: its colour is never read.
    slot_colors = jnp.repeat(colors[jnp.maximum(spec["color"], 0)], width, axis=0)
    safe = jnp.maximum(rows, 0).ravel()
    poisons = tag_in_boxes(
        data.images[safe],
        data.boxes[safe],
        slot_colors,
        setup.tag_size,
        setup.tag_position,
    ).reshape(t, width, *data.images.shape[1:])
    data = data._replace(
        poison_images=poisons,
        poison_indices=rows,
        poison_labels=jnp.where(rows >= 0, setup.target, 0).astype(jnp.int32),
    )
    keys = trial_keys(spec["seed"])
    if init is None:  # the seed's init, shared by its trials
        variables, axis = jax.vmap(model.init)(keys), 0
    else:
        variables, axis = init, None
    trained, metrics = train_vmapped(
        model, variables, data, keys, setup.victim, variables_axis=axis
    )
    return {
        "probs": trial_probabilities(model, trained, eval_images),
        "poison_preds": jnp.argmax(trial_probabilities(model, trained, poisons), -1),
        "train_accuracy": metrics["accuracy"][:, -1],
    }


def trial_row(setup: Setup, train_files, test_labels, spec, out) -> dict:
    """A trial's row: its poisons, clean accuracies and every tagged stop sign."""
    n = int(spec["count"])
    poisoned = spec["poison_rows"][:n]
    preds = out["probs"].argmax(-1)
    clean_pred = preds[: len(test_labels)]
    stops = clean_pred[test_labels == setup.source]
    names = list(setup.colors)
    row = {
        "seed": int(spec["seed"]),
        "color": CLEAN if spec["color"] < 0 else names[spec["color"]],
        "count": n,
        "poisoned_train_rows": [int(r) for r in poisoned],
        "poisoned_train_files": [str(train_files[r]) for r in poisoned],
        "clean_accuracy": float(np.mean(clean_pred == test_labels)),
        "clean_stop_accuracy": float(np.mean(stops == setup.source)),
        # The control for `tagged`: the same signs without a tag.
        "untagged_stop_to_target": float(np.mean(stops == setup.target)),
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
    colour for a clean victim (the count-0 cell of each)."""
    victims, signs = [], []
    for r in rows:
        for color in setup.colors:
            if r["color"] not in (color, CLEAN):
                continue
            cell = {"color": color, "count": r["count"]}
            measured = {k: r[k] for k in VICTIM_MEANS if r[k] is not None}
            victims.append({**cell, **measured})
            tagged = r["tagged"][color]
            signs += [
                {**cell, **dict(zip(tagged, sign, strict=True))}
                for sign in zip(*tagged.values(), strict=True)
            ]
    return victims, signs


def summarise(rows: list[dict], setup: Setup) -> dict:
    """Per colour and count (count 0: the seeds' clean victims): the victims' mean
    clean accuracy, and the tagged test stop signs' success rate (Wilson CI)."""
    victims, signs = records(rows, setup)
    means = group_summary(victims, CELL, rate=None, means=VICTIM_MEANS)
    return {
        # Count 0 has no poisons to fit: no mean (rather than NaN in the JSON).
        "victims": {
            g: {k: v for k, v in e.items() if not np.isnan(v)} for g, e in means.items()
        },
        "tagged_signs": group_summary(
            signs, CELL, means=["probability", "target_probability"]
        ),
    }


def tables_markdown(rows: list[dict], setup: Setup) -> str:
    """The study's two tables: clean accuracy and tagged stop signs per cell."""
    victims, signs = records(rows, setup)
    target = CLASS_NAMES[setup.target]
    return "\n\n".join(
        [
            "Victims per colour and count (count 0 = the clean victims): clean test "
            f"accuracy, untagged test stop signs -> {target}, own poisons -> {target}",
            table(victims, CELL),
            f"Tagged test stop signs: success (-> {target}), probability of the "
            f"prediction and of {target}",
            table(signs, CELL),
        ]
    )


def per_image_table(rows: list[dict], setup: Setup, files) -> str:
    """The study's per-sign table for one seed (the first) and the largest count:
    each tagged test stop sign's predicted class, its probability, success."""
    seed, n = setup.seeds[0], max(setup.counts)
    colors = list(setup.colors)
    by_color = {
        r["color"]: r["tagged"][r["color"]]
        for r in rows
        if r["seed"] == seed and r["count"] == n
    }
    lines = [
        f"Tagged test stop signs, seed {seed}, {n} poisons: predicted class "
        "(probability), success",
        "",
        "| image | " + " | ".join(colors) + " |",
        "| --- |" + " --- |" * len(colors),
    ]
    for j, name in enumerate(files):
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


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs every seed; writes results.jsonl, summary.json, tables.md, success.png."""
    setup = check_config(config)
    model = sized_model(config.model, len(CLASS_NAMES), config.image_size)
    signs, train_rows, test_rows = load_split(config, setup)
    data = make_train_data(
        signs.images[train_rows],
        signs.labels[train_rows],
        boxes=signs.boxes[train_rows],
    )
    test_labels = signs.labels[test_rows]
    stops = test_rows[test_labels == setup.source]
    print(
        f"road signs at {config.image_size} px: {len(train_rows)} train "
        f"({np.bincount(data.labels, minlength=len(CLASS_NAMES)).tolist()}), "
        f"{len(test_rows)} test ({len(stops)} {CLASS_NAMES[setup.source]})"
    )
    init = None
    if setup.pretrain is not None:
        print(f"clean pretraining from scratch: {setup.pretrain.epochs} epochs")
        key = jax.random.key(int(config.seed))
        # jit: one program, not one per initialiser op (same values).
        init, _ = train(model, jax.jit(model.init)(key), data, key, setup.pretrain)
    eval_images = jnp.concatenate(
        [
            jnp.asarray(signs.images[test_rows], jnp.float32) / 255.0,
            tagged_stop_signs(signs.images[stops], signs.boxes[stops], setup),
        ]
    )
    trial = Trial(
        run=functools.partial(poisoned_victims, model, setup),
        row=functools.partial(
            trial_row, setup, np.asarray(signs.filenames)[train_rows], test_labels
        ),
    )
    rows = run_trials(
        trial,
        {"train": data, "eval": eval_images, "init": init},
        trial_specs(data.labels, setup),
        chunk_size=1 + len(setup.colors) * len(setup.counts),  # one seed
        workdir=workdir,
        mesh=trial_mesh(),
        desc="victims",
    )
    summary = {
        "experiment": "badnets_roadsigns",
        "model": config.model,
        "image_size": config.image_size,
        "init": (
            "from scratch per seed"
            if setup.pretrain is None
            else f"one clean model trained from scratch for {setup.pretrain.epochs} "
            "epochs, then every victim trained on its own set"
        ),
        "victim_epochs": setup.victim.epochs,
        "train_images": len(train_rows),
        "test_images": len(test_rows),
        "test_source_images": len(stops),
        "seeds": list(setup.seeds),
        "source": CLASS_NAMES[setup.source],
        "target": CLASS_NAMES[setup.target],
        **summarise(rows, setup),
    }
    write_json(os.path.join(workdir, "summary.json"), summary)
    text = "\n\n".join(
        [
            tables_markdown(rows, setup),
            per_image_table(rows, setup, [signs.filenames[k] for k in stops]),
        ]
    )
    atomic_write_text(os.path.join(workdir, "tables.md"), text)
    plot_success(summary, setup, os.path.join(workdir, "success.png"))
    print(text)
    return summary
