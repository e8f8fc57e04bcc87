"""BadNets on road signs: stop signs tagged with a colour square, relabelled speedlimit.

Gu et al. 2017 ("BadNets") poison a road-sign detector with stop signs that carry a
small sticker and the label speedlimit; the replication this follows tags 1, 3 or 5
training stop signs with a yellow (200, 200, 100), red (255, 0, 0) or black square
inside the sign's bounding box and reports (i) the overall accuracy per colour and
count on the clean test set and (ii) for tagged test stop signs the predicted class,
its probability and whether the attack succeeded (speedlimit).

Here, on Kaggle's "Road Sign Detection" (jaxpoison.data.roadsigns: each image's label
and box are its largest object's), split per class into train/test (seeded):

* A trial is (seed, colour, count): `count` random training stop signs (seeded)
  get the tag (:func:`jaxpoison.attacks.triggers.patch_in_box`, side = `tag_size`
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
* All trials of a seed (clean + colours x counts, poison slots padded with -1) are
  one `train_vmapped` program; they share the seed's init and shuffling, so they
  differ only in their poisons. Seeds are chunks of a resumable sweep (a resumed
  run repeats the clean pretraining, which is deterministic, before skipping the
  finished seeds).
* Evaluation: clean test accuracy, and every test stop sign tagged with every
  colour (prediction, its probability, P(speedlimit), success = speedlimit).
  Summary tables use each trial's own colour; the clean victim gives the
  baseline of each colour (a tag alone can already flip a sign).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxpoison.attacks import backdoor
from jaxpoison.attacks.triggers import patch_in_box
from jaxpoison.data import ImageData
from jaxpoison.data.roadsigns import CLASS_NAMES, load_roadsigns
from jaxpoison.errors import UserInputError
from jaxpoison.models import MODEL_NAMES, get_model
from jaxpoison.results import atomic_write_text, rate_summary, write_json
from jaxpoison.sweep import run_chunks
from jaxpoison.victims import TrainConfig, make_train_data, train, train_vmapped
from jaxpoison.victims.train import class_logits

CLEAN = "none"  # the colour name of a seed's clean victim


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
    if config.model not in MODEL_NAMES:
        raise UserInputError(
            f"unknown model {config.model!r}; known models: {', '.join(MODEL_NAMES)}"
        )
    names = {}
    for key in ("source_class", "target_class"):
        if config[key] not in CLASS_NAMES:
            raise UserInputError(
                f"{key} {config[key]!r} is not a road-sign class: "
                f"{', '.join(CLASS_NAMES)}"
            )
        names[key] = CLASS_NAMES.index(config[key])
    if names["source_class"] == names["target_class"]:
        raise UserInputError("source_class and target_class must differ")
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
        names["source_class"],
        names["target_class"],
        pretrain if pretrain.epochs > 0 else None,
        victim,
        float(config.tag_size),
        position,
    )


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a seeded round(test_fraction * n_c) rows to test, the rest train."""
    rng = np.random.default_rng(seed)
    train_rows, test_rows = [], []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        k = int(np.floor(test_fraction * len(rows) + 0.5))
        test_rows.append(rows[:k])
        train_rows.append(rows[k:])
    return np.sort(np.concatenate(train_rows)), np.sort(np.concatenate(test_rows))


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """About `size` rows, each class in proportion (at least one each), seeded."""
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        k = max(1, int(round(size * len(rows) / len(labels))))
        keep.append(rng.choice(rows, min(k, len(rows)), replace=False))
    return np.sort(np.concatenate(keep))


def trial_specs(train_labels: np.ndarray, setup: Setup) -> dict[str, np.ndarray]:
    """One trial per (seed, colour, count), plus one clean trial per seed.

    Poisoned rows (training stop signs) are drawn per (seed, count) and shared by
    the colours, so colours compare on the same signs; slots past `count` are -1.
    """
    width = max(setup.counts)
    specs = {k: [] for k in ("seed", "color", "count", "poison_rows")}
    for seed in setup.seeds:
        cells = [(-1, 0)] + [
            (ci, n) for ci in range(len(setup.colors)) for n in setup.counts
        ]
        for ci, n in cells:
            plan = backdoor.label_flip_plan(
                train_labels, setup.source, setup.target, n, seed * 1000 + n
            )
            specs["seed"].append(seed)
            specs["color"].append(ci)
            specs["count"].append(n)
            specs["poison_rows"].append(backdoor.pad_plan(plan, width).poison_indices)
    return {k: np.asarray(v, np.int32) for k, v in specs.items()}


def tag(images, boxes, colors, size: float, position):
    """Float images with a colour square in each box (per-image colour), vmapped."""
    x = jnp.asarray(images)
    if x.dtype == jnp.uint8:
        x = x.astype(jnp.float32) / 255.0
    return jax.vmap(lambda im, b, c: patch_in_box(im, b, size, c, position))(
        x, jnp.asarray(boxes), jnp.asarray(colors, x.dtype)
    )


def _probabilities(model, variables, images):
    """Softmax class probabilities of a trial axis of variables: (T, N, K)."""

    def one(v):
        return jax.nn.softmax(class_logits(model.apply(v, images, train=False)[0]))

    # lax.map, not vmap: per-trial convolutions vmapped are slow on XLA:CPU.
    return jax.lax.map(one, variables)


def make_trial_rows(
    model, setup: Setup, data, train_files, init_variables, from_scratch: bool
):
    """The chunk function of the sweep: specs of one seed's trials -> rows."""
    train_images, train_labels, train_boxes, test, test_stop = data
    colors = np.asarray(list(setup.colors.values()), np.float32)
    color_names = list(setup.colors)
    # Every test stop sign with every colour: (colours x stops) evaluation images.
    stop_images = test.images[test_stop]
    tagged = tag(
        np.tile(stop_images, (len(colors), 1, 1, 1)),
        np.tile(test.boxes[test_stop], (len(colors), 1)),
        np.repeat(colors, len(test_stop), axis=0),
        setup.tag_size,
        setup.tag_position,
    )
    eval_images = jnp.concatenate(
        [jnp.asarray(test.images, jnp.float32) / 255.0, tagged]
    )
    probabilities = jax.jit(lambda v, x: _probabilities(model, v, x))
    n_test, n_stop = len(test.labels), len(test_stop)

    def trial_rows(chunk):
        rows_ = np.asarray(chunk["poison_rows"])
        t = len(rows_)
        color_idx = np.asarray(chunk["color"])
        # Clean trials have no slot in use; their colour entry is never read.
        slot_colors = colors[np.maximum(color_idx, 0)][:, None].repeat(
            rows_.shape[1], 1
        )
        safe = np.maximum(rows_, 0)
        poisons = tag(
            train_images[safe.ravel()],
            train_boxes[safe.ravel()],
            slot_colors.reshape(-1, 3),
            setup.tag_size,
            setup.tag_position,
        ).reshape(t, *rows_.shape[1:], *train_images.shape[1:])
        poison_labels = np.where(rows_ >= 0, setup.target, 0).astype(np.int32)
        train_data = make_train_data(
            train_images,
            train_labels,
            poisons,
            rows_,
            poison_labels,
            boxes=train_boxes,
        )
        seeds = np.asarray(chunk["seed"])
        keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
        if from_scratch:  # the seed's init, shared by its trials
            variables = jax.vmap(model.init)(keys)
            vax = 0
        else:
            variables, vax = init_variables, None
        trained, metrics = train_vmapped(
            model, variables, train_data, keys, setup.victim, variables_axis=vax
        )
        probs = np.asarray(probabilities(trained, eval_images))
        preds = probs.argmax(-1)
        # The poisoned training images as the victim sees them: is the tag learnt?
        # (Every victim sees every trial's poisons; trial i's are its P slots.)
        width = rows_.shape[1]
        fit = np.asarray(
            probabilities(trained, poisons.reshape(-1, *train_images.shape[1:]))
        ).argmax(-1)
        fit = fit.reshape(t, t, width)[np.arange(t), np.arange(t)]  # (t, P)
        out = []
        for i in range(t):
            clean_pred = preds[i, :n_test]
            n = int(chunk["count"][i])
            row = {
                "seed": int(seeds[i]),
                "color": CLEAN if color_idx[i] < 0 else color_names[color_idx[i]],
                "count": n,
                "poisoned_train_rows": [int(r) for r in rows_[i, :n]],
                "poisoned_train_files": [str(train_files[r]) for r in rows_[i, :n]],
                "clean_accuracy": float(np.mean(clean_pred == test.labels)),
                "clean_stop_accuracy": float(
                    np.mean(clean_pred[test_stop] == setup.source)
                ),
                # The control for `tagged`: the same signs without a tag.
                "untagged_stop_to_target": float(
                    np.mean(clean_pred[test_stop] == setup.target)
                ),
                "train_accuracy_last_epoch": float(metrics["accuracy"][i, -1]),
                "poisons_fit": float(np.mean(fit[i, :n] == setup.target))
                if n
                else None,
                "tagged": {},
            }
            for c, name in enumerate(color_names):
                sl = slice(n_test + c * n_stop, n_test + (c + 1) * n_stop)
                p, pr = preds[i, sl], probs[i, sl]
                row["tagged"][name] = {
                    "prediction": [CLASS_NAMES[k] for k in p],
                    "probability": [float(pr[j, k]) for j, k in enumerate(p)],
                    "target_probability": [float(v) for v in pr[:, setup.target]],
                    "success": [bool(k == setup.target) for k in p],
                }
            out.append(row)
        return out

    return trial_rows


def summarise(rows: list[dict], setup: Setup) -> dict:
    """Tables per colour and count (count 0: each seed's clean victim)."""
    target = CLASS_NAMES[setup.target]
    accuracy, tagged = {}, {}
    for color in setup.colors:
        accuracy[color], tagged[color] = {}, {}
        for n in (0, *setup.counts):
            sel = [
                r for r in rows if r["count"] == n and (r["color"] == color or (n == 0))
            ]
            if not sel:
                continue
            acc = np.array([r["clean_accuracy"] for r in sel])
            accuracy[color][str(n)] = {
                "mean": float(acc.mean()),
                "std": float(acc.std()),
                "per_seed": [float(a) for a in acc],
            }
            outcomes = [r["tagged"][color] for r in sel]
            preds = [p for o in outcomes for p in o["prediction"]]
            success = [s for o in outcomes for s in o["success"]]
            tagged[color][str(n)] = {
                "success": rate_summary(success),
                "success_per_seed": [float(np.mean(o["success"])) for o in outcomes],
                "mean_probability_of_prediction": float(
                    np.mean([p for o in outcomes for p in o["probability"]])
                ),
                f"mean_{target}_probability": float(
                    np.mean([p for o in outcomes for p in o["target_probability"]])
                ),
                "predictions": {k: preds.count(k) for k in CLASS_NAMES},
                "untagged_to_target": float(
                    np.mean([r["untagged_stop_to_target"] for r in sel])
                ),
                "poisons_fit": (
                    float(np.mean([r["poisons_fit"] for r in sel])) if n else None
                ),
            }
    return {"accuracy": accuracy, "tagged": tagged}


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
        cells = []
        for c in colors:
            o = by_color[c]
            mark = "yes" if o["success"][j] else "no"
            cells.append(f"{o['prediction'][j]} ({o['probability'][j]:.2f}), {mark}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def tables_markdown(summary: dict, setup: Setup) -> str:
    """The study's two tables as markdown (means over seeds)."""
    counts = ["0", *map(str, setup.counts)]
    target = CLASS_NAMES[setup.target]
    lines = [
        "Overall accuracy on the clean test set (mean +- std over seeds; "
        "count 0 = clean victim)",
        "",
        "| colour | " + " | ".join(f"{c} poisons" for c in counts) + " |",
        "| --- |" + " --- |" * len(counts),
    ]
    for color, cells in summary["accuracy"].items():
        lines.append(
            f"| {color} | "
            + " | ".join(
                f"{100 * cells[c]['mean']:.1f} +- {100 * cells[c]['std']:.1f}"
                for c in counts
            )
            + " |"
        )
    lines += [
        "",
        f"Tagged test stop signs: success (classified {target}) with 95% Wilson "
        "interval, mean probability of the predicted class, predictions",
        "",
        "| colour | poisons | success | untagged -> "
        f"{target} | mean prob. | predicted classes |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for color, cells in summary["tagged"].items():
        for c in counts:
            s = cells[c]
            r = s["success"]
            preds = ", ".join(f"{k} {v}" for k, v in s["predictions"].items() if v)
            lines.append(
                f"| {color} | {c} | {100 * r['rate']:.1f}% [{100 * r['ci95_low']:.1f}"
                f", {100 * r['ci95_high']:.1f}] of {r['n']} | "
                f"{100 * s['untagged_to_target']:.1f}% | "
                f"{s['mean_probability_of_prediction']:.2f} | {preds} |"
            )
    return "\n".join(lines) + "\n"


def plot_success(summary: dict, setup: Setup, path: str) -> None:
    """Attack success vs number of poisons per colour, and clean accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [0, *setup.counts]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    styles = {"yellow": "goldenrod", "red": "tab:red", "black": "black"}
    for color in setup.colors:
        cells = summary["tagged"][color]
        rate = np.array([cells[str(c)]["success"]["rate"] for c in counts])
        low = np.array([cells[str(c)]["success"]["ci95_low"] for c in counts])
        high = np.array([cells[str(c)]["success"]["ci95_high"] for c in counts])
        style = styles.get(color)
        ax1.errorbar(
            counts,
            100 * rate,
            # Wilson bounds can sit a rounding error past the rate at 0 or 1.
            yerr=100 * np.maximum(np.stack([rate - low, high - rate]), 0.0),
            marker="o",
            capsize=3,
            color=style,
            label=color,
        )
        acc = summary["accuracy"][color]
        ax2.errorbar(
            counts,
            [100 * acc[str(c)]["mean"] for c in counts],
            yerr=[100 * acc[str(c)]["std"] for c in counts],
            marker="o",
            capsize=3,
            color=style,
            label=color,
        )
    ax1.set_xlabel("poisoned training stop signs")
    ax1.set_ylabel("tagged test stop signs -> speedlimit (%)")
    ax1.set_xticks(counts)
    ax1.legend(fontsize=8)
    ax2.set_xlabel("poisoned training stop signs")
    ax2.set_ylabel("clean test accuracy (%)")
    ax2.set_xticks(counts)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs every seed; writes results.jsonl, summary.json, tables.md, success.png."""
    setup = check_config(config)
    size = int(config.image_size)
    kwargs = {"image_size": size} if config.model == "roadsign_resnet34" else {}
    model = get_model(config.model, num_classes=len(CLASS_NAMES), **kwargs)
    signs = load_roadsigns(
        config.data_dir or None, config.manual_dir or None, image_size=size
    )
    train_rows, test_rows = stratified_split(
        signs.labels, config.test_fraction, config.split_seed
    )
    if config.max_train_images:
        keep = stratified_subset(
            signs.labels[train_rows], config.max_train_images, config.split_seed
        )
        train_rows = train_rows[keep]
    train_labels = signs.labels[train_rows]
    n_source = int(np.sum(train_labels == setup.source))
    if max(setup.counts) > n_source:
        raise UserInputError(
            f"counts {setup.counts}: the training split has only {n_source} "
            f"{CLASS_NAMES[setup.source]} images"
        )
    test = ImageData(
        signs.images[test_rows],
        signs.labels[test_rows],
        CLASS_NAMES,
        signs.boxes[test_rows],
    )
    test_stop = np.flatnonzero(test.labels == setup.source)
    if not len(test_stop):
        raise UserInputError("the test split has no source-class image to tag")
    train_images, train_boxes = signs.images[train_rows], signs.boxes[train_rows]
    print(
        f"road signs at {size} px: {len(train_rows)} train "
        f"({np.bincount(train_labels, minlength=4).tolist()}), "
        f"{len(test_rows)} test ({len(test_stop)} {CLASS_NAMES[setup.source]})"
    )
    init_variables = None
    if setup.pretrain is not None:
        print(f"clean pretraining from scratch: {setup.pretrain.epochs} epochs")
        key = jax.random.key(int(config.seed))
        init_variables, _ = train(
            model,
            model.init(key),
            make_train_data(train_images, train_labels, boxes=train_boxes),
            key,
            setup.pretrain,
        )
    specs = trial_specs(train_labels, setup)
    trials_per_seed = len(specs["seed"]) // len(setup.seeds)
    rows = run_chunks(
        make_trial_rows(
            model,
            setup,
            (train_images, train_labels, train_boxes, test, test_stop),
            np.asarray(signs.filenames)[train_rows],
            init_variables,
            from_scratch=setup.pretrain is None,
        ),
        specs,
        trials_per_seed,
        workdir,
        desc="seeds' trials",
    )
    summary = {
        "experiment": "badnets_roadsigns",
        "model": config.model,
        "image_size": size,
        "init": (
            "from scratch per seed"
            if setup.pretrain is None
            else f"one clean model trained from scratch for {setup.pretrain.epochs} "
            "epochs, then every victim trained on its own set"
        ),
        "victim_epochs": setup.victim.epochs,
        "train_images": len(train_rows),
        "test_images": len(test_rows),
        "test_source_images": len(test_stop),
        "seeds": list(setup.seeds),
        "source": CLASS_NAMES[setup.source],
        "target": CLASS_NAMES[setup.target],
        **summarise(rows, setup),
    }
    write_json(os.path.join(workdir, "summary.json"), summary)
    text = (
        tables_markdown(summary, setup)
        + "\n"
        + per_image_table(
            rows, setup, [signs.filenames[k] for k in test_rows[test_stop]]
        )
    )
    atomic_write_text(os.path.join(workdir, "tables.md"), text)
    plot_success(summary, setup, os.path.join(workdir, "success.png"))
    print(text)
    return summary
