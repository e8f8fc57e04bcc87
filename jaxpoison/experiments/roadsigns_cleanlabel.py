"""Clean-label Poison Frogs on road signs: the replication study's protocol.

The study fine-tunes an ImageNet-pretrained ResNet-34 with two heads (4-way
classification and bounding-box regression, L1 box loss x 1/1000) on the Kaggle
road-sign images, with the backbone frozen (the heads train) or unfrozen (every
layer), and attacks it with Poison Frogs (Shafahi et al. 2018): base class stop,
target class traffic light, poisons crafted by Algorithm 1 with an Adam forward step
(lambda 0.01, beta 0.25) in the pretrained network's features, added one at a time
(1-4) to the training set with their clean labels. Its Table 1 reports, for base and
target images that hold one class or several (single- vs multi-class), the target's
softmax, the model's accuracy and the F1 of the base and target classes; its result
is that the attack fails (no target poisoned; accuracy 0.73-0.76).

Here (each image's class and box are its largest object's; an image is multi-class
when its annotations name more than one class):

* No ImageNet weights exist offline: the backbone is a CIFAR-10 ResNet
  (`roadsign_resnet20`, the same as configs/badnets_roadsigns.py), with the study's
  two heads fresh from each victim's key. Poisons are crafted in the pretrained
  backbone's pooled features (what the attacker knows and the frozen victim keeps).
* One stratified 80/20 split (seed `seed`). A clean model (the pretrained backbone
  fine-tuned on the clean training split like an unfrozen victim) is trained once
  and saved (`clean_model.msgpack`); the targets are the held-out traffic lights it
  classifies correctly, of each target type, up to `targets_per_type`.
* A trial is (target, base type): `max_poisons` stop signs of that type from the
  training split are the bases; the poisons collide with the (centre-cropped)
  target. Victims: for each backbone setting, n = 0..max_poisons, the n-poison
  victim has the first n bases replaced by their poisons (every victim trains on the
  same rows, the trial's key): frozen = the heads trained on the pretrained
  features, unfrozen = end to end.
* Training follows configs/badnets_roadsigns.py (Adam 1e-3, batch 64, 10 epochs,
  box-aware rotation / flip / crop as epoch copies, centre crop at test time): the
  poisons are augmented like the rows they replace.

Output per (base type, target type, backbone, n): poisoned rate (Wilson CI), the
target's softmax for stop and for traffic light, model accuracy, F1 of stop and of
traffic light: results.jsonl (a row per trial), summary.json, tables.md,
poisoned.png. The targets are a resumable sweep (`run_trials`).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxpoison.attacks import feature_collision_adam as fca
from jaxpoison.data import MANUAL_DIR_ENV, check_choice, check_distinct, class_index
from jaxpoison.data.roadsigns import CLASS_NAMES, load_roadsigns
from jaxpoison.data.stratified import stratified_split, stratified_subset
from jaxpoison.errors import UserInputError
from jaxpoison.models import (
    graft_backbone,
    pretrained_backbone,
    sized_model,
)
from jaxpoison.models.roadsign_cifar import NAMES as PRETRAINABLE
from jaxpoison.plots import new_figure, rate_errorbar, save_figure
from jaxpoison.report import table
from jaxpoison.results import atomic_write_text, write_json
from jaxpoison.summaries import group_summary
from jaxpoison.sweep import Trial, run_trials, saved_unit, trial_keys, trial_seeds
from jaxpoison.sweep.sharding import trial_mesh
from jaxpoison.victims import (
    TrainConfig,
    cache_features,
    evaluate,
    make_train_data,
    train_vmapped,
)
from jaxpoison.victims import box_augment as ba
from jaxpoison.victims.probabilities import class_probabilities, f1_scores
from jaxpoison.victims.train import train

BACKBONES = ("frozen", "unfrozen")
IMAGE_TYPES = ("single", "multi")  # one class in the image's annotations, or more
SETTING = ("base_type", "target_type", "backbone", "n_poisons")
MEANS = ("accuracy", "f1_base", "f1_target", "target_prob_base", "target_prob_target")


@dataclasses.dataclass(frozen=True)
class Setup:
    """The validated config."""

    craft: fca.AdamFCConfig
    victims: dict[str, TrainConfig]  # as stated (epochs = passes)
    base_class: int
    target_class: int
    base_types: tuple[str, ...]
    target_types: tuple[str, ...]
    augment: ba.BoxAugment | None
    epochs: int  # passes; every victim setting and the clean model share them

    @property
    def copies(self) -> int:
        return self.epochs if self.augment else 1

    def trainer(self, cfg: TrainConfig) -> TrainConfig:
        """One pass over the epoch copies when augmenting."""
        return cfg if self.augment is None else dataclasses.replace(cfg, epochs=1)


def check_config(config) -> Setup:
    """Everything that needs no data (one-line UserInputErrors)."""
    craft = fca.AdamFCConfig(**config.craft)
    victims = {}
    for backbone in config.backbones:
        check_choice(backbone, BACKBONES, "backbone setting")
        mode = "linear" if backbone == "frozen" else "end_to_end"
        victims[backbone] = TrainConfig.from_mapping(
            {**config.victim[backbone], "mode": mode}
        )
    if not victims:
        raise UserInputError("config.backbones is empty: frozen and/or unfrozen")
    epochs = {cfg.epochs for cfg in victims.values()}
    if len(epochs) != 1 or any(cfg.augment for cfg in victims.values()):
        raise UserInputError(
            "the victims share one number of epochs (the epoch copies) and use "
            "config.augment, not victim.augment"
        )
    if config.max_poisons < 1 or config.targets_per_type < 1:
        raise UserInputError("max_poisons and targets_per_type must be >= 1")
    classes = tuple(
        class_index(config[name], CLASS_NAMES, name)
        for name in ("base_class", "target_class")
    )
    check_distinct(classes, "base_class and target_class")
    for name in ("base_types", "target_types"):
        if not config[name]:
            raise UserInputError(f"config.{name} is empty: single and/or multi")
        for kind in config[name]:
            check_choice(kind, IMAGE_TYPES, name[:-1].replace("_", " "))
    if config.model not in PRETRAINABLE:
        raise UserInputError(
            f"model {config.model!r} has no pretrained backbone here: "
            f"{', '.join(PRETRAINABLE)}"
        )
    augment = ba.BoxAugment(**config.augmentation) if config.augment else None
    return Setup(
        craft,
        victims,
        *classes,
        tuple(config.base_types),
        tuple(config.target_types),
        augment,
        epochs.pop(),
    )


def image_types(signs) -> np.ndarray:
    """Per image: 1 when its annotations name more than one class, else 0."""
    multi = np.zeros(len(signs.labels), np.int32)
    for i in range(len(signs.labels)):
        classes = set(signs.object_labels[signs.object_image_index == i].tolist())
        multi[i] = len(classes) > 1
    return multi


def load_split(config):
    """Road-sign images at `config.image_size`, split train/test (stratified,
    seeded); the training part optionally a stratified subset."""
    sources = (config.manual_dir, os.environ.get(MANUAL_DIR_ENV))  # --manual_dir
    data_dirs = (config.data_dir, os.environ.get("TFDS_DATA_DIR"))  # --data_dir
    if not any(sources) and not any(data_dirs):
        raise UserInputError(
            "road signs need --manual_dir (the Kaggle layout, e.g. "
            "../shared/data/roadsigns) or a --data_dir where road_signs is prepared"
        )
    signs = load_roadsigns(
        config.data_dir or None, config.manual_dir or None, config.image_size
    )
    train_rows, test_rows = stratified_split(
        signs.labels, config.test_fraction, config.seed
    )
    if config.max_train_images:  # a smaller training set, classes in proportion
        keep = stratified_subset(
            signs.labels[train_rows], config.max_train_images, config.seed
        )
        train_rows = train_rows[keep]
    return signs, train_rows, test_rows


def centre_crop(images, setup: Setup):
    """Images as the victims see them at test time (centre crop when augmenting)."""
    if setup.augment is None:
        return images
    t = ba.centre((images.shape[0],), setup.augment)
    boxes = jnp.zeros((images.shape[0], 4), jnp.float32)
    return ba.warp(images, boxes, t, setup.augment.crop_margin)[0]


def make_shared(signs, train_rows, test_rows, config, setup: Setup) -> dict:
    """What every trial reads: the training set as epoch copies (with their
    transforms and, for frozen victims, their pretrained features), the test set
    centre-cropped, and the pretrained backbone."""
    images = np.asarray(signs.images)[train_rows]
    boxes = np.asarray(signs.boxes, np.float32)[train_rows]
    labels = np.asarray(signs.labels, np.int32)[train_rows]
    if setup.augment is not None:
        key = jax.random.key(int(config.augment_seed))
        copies, copy_boxes, transforms = ba.epoch_copies(
            images, boxes, key, setup.copies, setup.augment
        )
    else:
        copies, copy_boxes, transforms = images, boxes, None
    model = sized_model(config.model, len(CLASS_NAMES), config.image_size)
    backbone = pretrained_backbone(config.model, config.weights)
    pretrained = graft_backbone(jax.jit(model.init)(jax.random.key(0)), backbone)
    features = None
    if "frozen" in setup.victims:  # the frozen victims' features, computed once
        data = make_train_data(copies, np.tile(labels, setup.copies))
        features = cache_features(model, pretrained, data).features
    test = jnp.asarray(signs.images[test_rows], jnp.float32) / 255.0
    return {
        "images": images,
        "boxes": boxes,
        "labels": labels,
        "copies": copies,
        "copy_labels": np.tile(labels, setup.copies),
        "copy_boxes": copy_boxes,
        "copy_features": features,
        "transforms": transforms,
        "test_images": np.asarray(centre_crop(test, setup)),
        "test_labels": np.asarray(signs.labels[test_rows], np.int32),
        "backbone": backbone,
        "pretrained": pretrained,
    }


def clean_model(model, shared, config, setup: Setup, workdir):
    """The clean model (pretrained backbone + heads trained end to end on the clean
    training split like an unfrozen victim), trained once and saved in `workdir`."""
    init_seed, train_seed = trial_seeds(config.seed, 2)
    fresh = jax.jit(model.init)(jax.random.key(int(init_seed)))
    template = graft_backbone(fresh, shared["backbone"])
    cfg = TrainConfig.from_mapping({**config.victim.unfrozen, "mode": "end_to_end"})

    def make():
        print(
            f"training the clean model ({config.model}, pretrained backbone) on "
            f"{len(shared['labels'])} images ({setup.epochs} epochs)"
        )
        data = make_train_data(
            shared["copies"], shared["copy_labels"], boxes=shared["copy_boxes"]
        )
        trained, _ = train(
            model, template, data, jax.random.key(int(train_seed)), setup.trainer(cfg)
        )
        return trained

    return saved_unit(
        os.path.join(workdir, "clean_model.msgpack"),
        make,
        flax.serialization.to_bytes,
        functools.partial(flax.serialization.from_bytes, template),
    )


def make_specs(config, setup: Setup, eligible, multi_test, bases_pool, multi_train):
    """Trials: per target type up to `targets_per_type` eligible targets (seeded),
    each with every base type (`max_poisons` bases of that type, seeded)."""
    rng = np.random.default_rng(config.seed)
    specs = {k: [] for k in ("target_pos", "target_type", "base_type", "base_rows")}
    for tt in setup.target_types:
        pool = eligible[multi_test[eligible] == IMAGE_TYPES.index(tt)]
        if len(pool) == 0:
            raise UserInputError(
                f"no {tt}-class held-out {config.target_class} image that the clean "
                "model classifies correctly"
            )
        k = min(config.targets_per_type, len(pool))
        for target in np.sort(rng.choice(pool, k, replace=False)):
            for bt in setup.base_types:
                kind = bases_pool[multi_train[bases_pool] == IMAGE_TYPES.index(bt)]
                if len(kind) < config.max_poisons:
                    raise UserInputError(
                        f"max_poisons={config.max_poisons}: only {len(kind)} "
                        f"{bt}-class {config.base_class} training images"
                    )
                specs["target_pos"].append(target)
                specs["target_type"].append(IMAGE_TYPES.index(tt))
                specs["base_type"].append(IMAGE_TYPES.index(bt))
                specs["base_rows"].append(
                    rng.choice(kind, config.max_poisons, replace=False)
                )
    out = {k: np.asarray(v, np.int32) for k, v in specs.items()}
    out["seed"] = trial_seeds(config.seed, len(out["target_pos"]))
    return out


def cleanlabel_trials(model, setup: Setup, shared, spec):
    """T trials: craft N poisons each; train the (backbone x n = 0..N) victims.

    Returns per trial: per-victim arrays (T, B, N + 1) for B backbone settings,
    and each poison's feature distance to its target and l_inf perturbation (N,).
    """
    base_rows = spec["base_rows"]
    t, max_poisons = base_rows.shape
    test_images, test_labels = shared["test_images"], shared["test_labels"]
    targets = test_images[spec["target_pos"]]
    bases = shared["images"][base_rows].astype(jnp.float32) / 255.0  # (T, N, ...)
    flat = bases.reshape(t * max_poisons, *bases.shape[2:])
    pretrained = shared["pretrained"]
    poisons, _ = fca.craft(
        model,
        pretrained,
        flat,
        jnp.repeat(targets, max_poisons, axis=0),
        setup.craft,
    )
    poisons = jnp.round(poisons * 255.0) / 255.0  # stored as 8-bit images
    target_feats = model.apply(pretrained, targets)[1]
    poison_feats = model.apply(pretrained, poisons)[1]
    distance = jnp.linalg.norm(
        poison_feats.reshape(t, max_poisons, -1) - target_feats[:, None], axis=-1
    )
    poisons = poisons.reshape(bases.shape)
    counts = jnp.arange(max_poisons + 1)
    slot = jnp.arange(max_poisons)
    # Victim (trial i, count n): the first n bases of trial i replaced.
    rows = jnp.where(slot[None, None] < counts[None, :, None], base_rows[:, None], -1)
    v = t * (max_poisons + 1)
    rows = rows.reshape(v, max_poisons)
    victim_poisons = jnp.repeat(poisons, max_poisons + 1, axis=0)
    n_train = shared["images"].shape[0]
    if setup.augment is not None:  # each epoch's transform of the replaced rows
        victim_poisons = jax.vmap(
            lambda x, r: ba.warp_rows(
                x,
                shared["boxes"][jnp.maximum(r, 0)],
                r,
                shared["transforms"],
                setup.augment.crop_margin,
            )
        )(victim_poisons, rows)
    copies = setup.copies
    data = make_train_data(
        shared["copies"], shared["copy_labels"], boxes=shared["copy_boxes"]
    )._replace(
        poison_images=victim_poisons,
        poison_indices=ba.copy_rows(rows, copies, n_train),
        poison_labels=jnp.full((v, copies * max_poisons), setup.base_class, jnp.int32),
    )
    keys = jnp.repeat(trial_keys(spec["seed"]), max_poisons + 1)
    target_of_victim = jnp.repeat(targets, max_poisons + 1, axis=0)
    stacked = jax.tree.map(
        lambda x: jnp.broadcast_to(x, (v, *x.shape)), shared["backbone"]
    )
    inits = graft_backbone(jax.vmap(model.init)(keys), stacked)

    def assess(args):
        victim, target = args
        probs = class_probabilities(model, victim, target[None])[0]
        ev = evaluate(model, victim, test_images, test_labels)
        f1 = f1_scores(ev["predictions"], test_labels, len(CLASS_NAMES))
        return probs, ev["accuracy"], f1

    out: dict[str, list] = {}
    for name, cfg in setup.victims.items():
        vdata = data
        if name == "frozen":
            vdata = data._replace(features=shared["copy_features"])
        trained, _ = train_vmapped(
            model, inits, vdata, keys, setup.trainer(cfg), variables_axis=0
        )
        probs, accuracy, f1 = jax.lax.map(assess, (trained, target_of_victim))
        values = {
            "prediction": jnp.argmax(probs, -1),
            "target_prob_base": probs[:, setup.base_class],
            "target_prob_target": probs[:, setup.target_class],
            "accuracy": accuracy,
            "f1_base": f1[:, setup.base_class],
            "f1_target": f1[:, setup.target_class],
        }
        for k, val in values.items():
            out.setdefault(k, []).append(val.reshape(t, max_poisons + 1))
    result = {k: jnp.stack(val, axis=1) for k, val in out.items()}  # (T, B, N + 1)
    result["feature_distance"] = distance
    result["perturbation_linf"] = jnp.abs(poisons - bases).max(axis=(2, 3, 4))
    return result


def target_row(test_files, train_files, setup: Setup, spec, out) -> dict:
    """A trial's row: its target, bases, poisons' statistics and every victim."""
    return {
        "target_file": test_files[spec["target_pos"]],
        "target_type": IMAGE_TYPES[int(spec["target_type"])],
        "base_type": IMAGE_TYPES[int(spec["base_type"])],
        "base_files": [train_files[r] for r in spec["base_rows"]],
        "seed": int(spec["seed"]),
        "feature_distance": out["feature_distance"].tolist(),
        "perturbation_linf": out["perturbation_linf"].tolist(),
        "victims": {
            backbone: [
                {
                    "n_poisons": n,
                    "prediction": CLASS_NAMES[int(out["prediction"][b, n])],
                    "poisoned": int(out["prediction"][b, n]) == setup.base_class,
                    **{key: float(out[key][b, n]) for key in MEANS},
                }
                for n in range(len(spec["base_rows"]) + 1)
            ]
            for b, backbone in enumerate(setup.victims)
        },
    }


def victim_records(rows) -> list[dict]:
    """One record per victim: its types, backbone setting, poison count, outcome,
    and `flipped`: poisoned while the trial's victim without poisons (same key,
    same backbone setting) was not."""
    return [
        {
            "base_type": r.get("base_type", "single"),
            "target_type": r.get("target_type", "single"),
            "backbone": b,
            **v,
            "flipped": bool(v["poisoned"] and not vs[0]["poisoned"]),
        }
        for r in rows
        for b, vs in r["victims"].items()
        for v in vs
    ]


def verdict(records: list[dict], setup: Setup, max_poisons: int) -> dict:
    """Per backbone setting: poisoned targets among the victims with poisons (and
    those flipped: poisoned where the trial's victim without poisons was not), the
    range of model accuracy, and the target's softmax for the base class without
    and with all the poisons (mean over targets; the study's failure with a
    softmax trend is: none poisoned, the softmax rising with n)."""
    out = {}
    for b in setup.victims:
        mine = [r for r in records if r["backbone"] == b]
        if not mine:
            continue
        poisoned = [r["poisoned"] for r in mine if r["n_poisons"] > 0]
        flipped = [r["flipped"] for r in mine if r["n_poisons"] > 0]

        def mean_prob(n, mine=mine):
            return float(
                np.mean([r["target_prob_base"] for r in mine if r["n_poisons"] == n])
            )

        out[b] = {
            "poisoned_with_poisons": int(sum(poisoned)),
            "flipped_with_poisons": int(sum(flipped)),
            "victims_with_poisons": len(poisoned),
            "accuracy_range": [
                min(r["accuracy"] for r in mine),
                max(r["accuracy"] for r in mine),
            ],
            "target_prob_base_n0": mean_prob(0),
            f"target_prob_base_n{max_poisons}": mean_prob(max_poisons),
        }
    return out


def table_one(summary: dict, setup: Setup, max_poisons: int) -> str:
    """The study's Table 1 layout: per base/target image type, backbone and n, the
    target's softmax (%) for stop and for traffic light, poisoned targets, model
    accuracy, F1 of the base and target classes (means over targets)."""
    base, target = CLASS_NAMES[setup.base_class], CLASS_NAMES[setup.target_class]
    lines = [
        f"| base image | target image | backbone | poisons | target softmax {base} "
        f"(%) | target softmax {target} (%) | poisoned (flipped) | model accuracy | F1 "
        f"{base} | F1 {target} |",
        "| --- |" + " --- |" * 9,
    ]
    for bt in setup.base_types:
        for tt in setup.target_types:
            for b in setup.victims:
                for n in range(max_poisons + 1):
                    s = summary.get(
                        f"base_type={bt},target_type={tt},backbone={b},n_poisons={n}"
                    )
                    if s is None:
                        continue
                    lines.append(
                        f"| {bt}-class | {tt}-class | {b} | {n} | "
                        f"{100 * s['mean_target_prob_base']:.1f} | "
                        f"{100 * s['mean_target_prob_target']:.1f} | "
                        f"{s['successes']}/{s['n']} [{100 * s['ci95_low']:.0f}, "
                        f"{100 * s['ci95_high']:.0f}]%, "
                        f"{round(s['mean_flipped'] * s['n'])} flipped | "
                        f"{s['mean_accuracy']:.3f} | "
                        f"{s['mean_f1_base']:.3f} | {s['mean_f1_target']:.3f} |"
                    )
    return "\n".join(lines)


def plot(summary, setup: Setup, max_poisons, path) -> None:
    """Poisoned rate and the target's base-class softmax against n, per backbone
    (all image types together)."""
    n = np.arange(max_poisons + 1)
    fig, axes = new_figure(1, 2, size=(9, 3.4))
    for b in setup.victims:
        s = [summary[f"backbone={b},n_poisons={k}"] for k in n]
        rate_errorbar(axes[0], n, s, label=b)
        axes[1].plot(n, [x["mean_target_prob_base"] for x in s], marker="o", label=b)
    axes[0].set(xlabel="poisons", ylabel="targets poisoned (%)", ylim=(-5, 105))
    axes[1].set(
        xlabel="poisons",
        ylabel=f"target's softmax for {CLASS_NAMES[setup.base_class]} (mean)",
    )
    for ax in axes:
        ax.legend(fontsize=8)
    save_figure(fig, path)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains the clean model, runs the trials' sweep; writes results and tables."""
    setup = check_config(config)
    model = sized_model(config.model, len(CLASS_NAMES), config.image_size)
    signs, train_rows, test_rows = load_split(config)
    shared = make_shared(signs, train_rows, test_rows, config, setup)
    os.makedirs(workdir, exist_ok=True)
    clean_vars = clean_model(model, shared, config, setup, workdir)
    test_images, test_labels = shared["test_images"], shared["test_labels"]
    clean_eval = evaluate(model, clean_vars, test_images, test_labels)
    clean_pred = np.asarray(clean_eval["predictions"])
    clean_f1 = np.asarray(f1_scores(clean_pred, test_labels, len(CLASS_NAMES)))
    print(
        f"clean model: test accuracy {100 * float(clean_eval['accuracy']):.2f}% on "
        f"{len(test_rows)} images; F1 "
        + ", ".join(f"{c} {f:.3f}" for c, f in zip(CLASS_NAMES, clean_f1, strict=True))
    )
    types = image_types(signs)
    eligible = np.flatnonzero(
        (test_labels == setup.target_class) & (clean_pred == setup.target_class)
    )
    bases_pool = np.flatnonzero(shared["labels"] == setup.base_class)
    specs = make_specs(
        config, setup, eligible, types[test_rows], bases_pool, types[train_rows]
    )
    files = np.asarray(signs.filenames)
    trial = Trial(
        run=functools.partial(cleanlabel_trials, model, setup),
        row=functools.partial(
            target_row, files[test_rows].tolist(), files[train_rows].tolist(), setup
        ),
    )
    rows = run_trials(
        trial,
        shared,
        specs,
        chunk_size=config.chunk_size,
        workdir=workdir,
        mesh=trial_mesh(),
        desc="trials",
    )
    records = victim_records(rows)
    means = (*MEANS, "flipped")
    by_type = group_summary(records, SETTING, "poisoned", means)
    overall = group_summary(records, ("backbone", "n_poisons"), "poisoned", means)
    plot(overall, setup, config.max_poisons, os.path.join(workdir, "poisoned.png"))
    result = {
        "experiment": "roadsigns_cleanlabel",
        "model": config.model,
        "image_size": config.image_size,
        "train_images": len(train_rows),
        "test_images": len(test_rows),
        "eligible_targets": {
            tt: int(np.sum(types[test_rows][eligible] == IMAGE_TYPES.index(tt)))
            for tt in IMAGE_TYPES
        },
        "clean_model": {
            "accuracy": float(clean_eval["accuracy"]),
            "f1": dict(zip(CLASS_NAMES, clean_f1.tolist(), strict=True)),
        },
        "settings": overall,
        "table_1": by_type,
        "verdict": verdict(records, setup, config.max_poisons),
    }
    write_json(os.path.join(workdir, "summary.json"), result)
    text = "\n\n".join(
        [
            "Table 1 (the study's layout; means over targets, poisoned with a 95% "
            "Wilson interval)",
            table_one(by_type, setup, config.max_poisons),
            "Per backbone and n over all targets",
            table(records, ("backbone", "n_poisons")),
            "Verdict per backbone (poisoned victims among those with poisons, of "
            "which flipped from their trial's victim without poisons; model "
            "accuracy range; the target's mean p(base) at n = 0 and n = max): "
            + "; ".join(
                f"{b}: {v['poisoned_with_poisons']}/{v['victims_with_poisons']} "
                f"({v['flipped_with_poisons']} flipped), "
                f"{v['accuracy_range'][0]:.3f}-{v['accuracy_range'][1]:.3f}, "
                f"{v['target_prob_base_n0']:.3f} -> "
                f"{v[f'target_prob_base_n{config.max_poisons}']:.3f}"
                for b, v in result["verdict"].items()
            ),
        ]
    )
    atomic_write_text(os.path.join(workdir, "tables.md"), text)
    print(text)
    return result
