"""Clean-label Poison Frogs on road signs: the replication study's protocol.

A ResNet-34-style network with two heads (4-way classification and bounding-box
regression, L1 box loss x 1/1000) is trained on the Kaggle road-sign images (the
largest object of each image gives its class and box). The attack: base class stop,
target class traffic light. Per target (a held-out traffic-light image the clean
model classifies correctly), poisons are crafted with Algorithm 1 of Shafahi et al.
2018 (feature collision in the pooled 512-d features of the clean model) from
stop-sign training images and enter the training set with their clean labels (stop)
and boxes; the victim retrains from the clean model with the backbone FROZEN (only
the two heads train) or UNFROZEN (every layer), with 0, 1, 2, 3, 4 poisons "added
one at a time" (the n-poison victim has the first n bases replaced by their
poisons; every victim trains on the same rows).

The study's table, per (backbone, n): model accuracy on the held-out images, F1 of
the base (stop) and target (traffic light) classes, the target's softmax for both,
and whether it is poisoned (classified as stop). Here over several targets, with
Wilson intervals on the poisoned rate.

The clean model is trained once per workdir and saved (`clean_model.msgpack`), so a
rerun resumes without retraining; the targets are a resumable sweep (`run_trials`).
"""

from __future__ import annotations

import functools
import os

import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxpoison.attacks import feature_collision as fc
from jaxpoison.data import (
    MANUAL_DIR_ENV,
    check_choice,
    check_distinct,
    class_index,
    split_fractions,
)
from jaxpoison.data.roadsigns import CLASS_NAMES, load_roadsigns
from jaxpoison.data.stratified import stratified_subset
from jaxpoison.errors import UserInputError
from jaxpoison.models import sized_model
from jaxpoison.plots import new_figure, rate_errorbar, save_figure
from jaxpoison.report import table
from jaxpoison.results import write_json
from jaxpoison.summaries import group_summary
from jaxpoison.sweep import Trial, run_trials, saved_unit, trial_keys, trial_seeds
from jaxpoison.sweep.sharding import trial_mesh
from jaxpoison.victims import TrainConfig, evaluate, make_train_data, train_vmapped
from jaxpoison.victims.probabilities import class_probabilities, f1_scores
from jaxpoison.victims.train import train

BACKBONES = ("frozen", "unfrozen")
SETTING = ("backbone", "n_poisons")  # what summaries group victims by
MEANS = ("accuracy", "f1_base", "f1_target", "target_prob_base", "target_prob_target")


def check_config(config):
    """The crafting config, one victim `TrainConfig` per backbone setting and the
    base and target class indices."""
    craft_cfg = fc.FCConfig(**config.craft)
    victims = {}
    for backbone in config.backbones:
        check_choice(backbone, BACKBONES, "backbone setting")
        mode = "linear" if backbone == "frozen" else "end_to_end"
        victims[backbone] = TrainConfig.from_mapping(
            {**config.victim[backbone], "mode": mode}
        )
    if not victims:
        raise UserInputError("config.backbones is empty: frozen and/or unfrozen")
    if config.max_poisons < 1 or config.num_targets < 1:
        raise UserInputError("max_poisons and num_targets must be >= 1")
    classes = tuple(
        class_index(config[name], CLASS_NAMES, name)
        for name in ("base_class", "target_class")
    )
    check_distinct(classes, "base_class and target_class")
    return craft_cfg, victims, *classes


def load_split(config):
    """Road-sign images at `config.image_size`, split train/test (seeded); the
    training part optionally a stratified subset of `max_train_images`."""
    sources = (config.manual_dir, os.environ.get(MANUAL_DIR_ENV))  # --manual_dir
    data_dirs = (config.data_dir, os.environ.get("TFDS_DATA_DIR"))  # --data_dir
    if not any(sources) and not any(data_dirs):
        raise UserInputError(
            "road signs need --manual_dir (the Kaggle layout, e.g. "
            "../shared/data/roadsigns) or a --data_dir where road_signs is prepared"
        )
    data = load_roadsigns(
        config.data_dir or None, config.manual_dir or None, config.image_size
    )
    train_rows, test_rows = split_fractions(
        len(data.labels), (1 - config.test_fraction, config.test_fraction), config.seed
    )
    if config.max_train_images:  # a smaller training set, classes in proportion
        keep = stratified_subset(
            data.labels[train_rows], config.max_train_images, config.seed
        )
        train_rows = train_rows[keep]
    return data, train_rows, test_rows


def clean_model(model, train_data, config, workdir):
    """The clean two-head model, trained from scratch once and saved in `workdir`."""
    init_seed, train_seed = trial_seeds(config.seed, 2)
    # jit: one program, not one per initialiser op (same values).
    template = jax.jit(model.init)(jax.random.key(int(init_seed)))

    def make():
        cfg = TrainConfig.from_mapping(config.clean_training)
        print(
            f"training the clean {model.name} from scratch on "
            f"{len(train_data.labels)} images ({cfg.epochs} epochs)"
        )
        trained, metrics = train(
            model, template, train_data, jax.random.key(int(train_seed)), cfg
        )
        accuracy = float(metrics["accuracy"][-1])
        print(f"clean model: final training accuracy {accuracy:.3f}")
        return trained

    return saved_unit(
        os.path.join(workdir, "clean_model.msgpack"),
        make,
        flax.serialization.to_bytes,
        functools.partial(flax.serialization.from_bytes, template),
    )


def make_specs(config, eligible, bases_pool) -> dict[str, np.ndarray]:
    """Targets (positions in the test split) and `max_poisons` base rows each."""
    if len(eligible) < config.num_targets:
        raise UserInputError(
            f"num_targets={config.num_targets}: the clean model classifies only "
            f"{len(eligible)} held-out {config.target_class} images correctly"
        )
    if len(bases_pool) < config.max_poisons:
        raise UserInputError(
            f"max_poisons={config.max_poisons}: only {len(bases_pool)} "
            f"{config.base_class} training images"
        )
    rng = np.random.default_rng(config.seed)
    targets = np.sort(rng.choice(eligible, config.num_targets, replace=False))
    bases = [rng.choice(bases_pool, config.max_poisons, replace=False) for _ in targets]
    return {
        "target_pos": targets.astype(np.int32),
        "base_rows": np.stack(bases).astype(np.int32),
        "seed": trial_seeds(config.seed, len(targets)),
    }


def cleanlabel_trials(
    model, craft_cfg, victim_cfgs, base_class, target_class, shared, spec
):
    """T targets: craft N poisons each; train the (backbone x n = 0..N) victims.

    Returns per target: per-victim arrays (B, N + 1) for B backbone settings, and
    each poison's feature distance to its target and l_inf perturbation (N,).
    """
    train_data, clean_vars, test_images, test_labels = shared
    base_rows = spec["base_rows"]
    t, max_poisons = base_rows.shape
    dtype = train_data.poison_images.dtype
    targets = test_images[spec["target_pos"]].astype(jnp.float32) / 255.0
    bases = train_data.images[base_rows].astype(dtype) / 255.0  # (T, N, H, W, C)
    flat = bases.reshape(t * max_poisons, *bases.shape[2:])
    # Shafahi et al. 2018, Alg. 1: every base collides with its target's features.
    poisons, _ = fc.craft(
        model, clean_vars, flat, jnp.repeat(targets, max_poisons, axis=0), craft_cfg
    )
    poisons = jnp.round(poisons * 255.0) / 255.0  # stored as 8-bit images
    target_feats = fc.target_features(model, clean_vars, targets)
    poison_feats = fc.target_features(model, clean_vars, poisons)
    distance = jnp.linalg.norm(
        poison_feats.reshape(t, max_poisons, -1) - target_feats[:, None], axis=-1
    )
    poisons = poisons.reshape(bases.shape)
    counts = jnp.arange(max_poisons + 1)
    slot = jnp.arange(max_poisons)
    # Victim (target i, count n): the first n bases of target i replaced.
    indices = jnp.where(
        slot[None, None] < counts[None, :, None], base_rows[:, None], -1
    )
    v = t * (max_poisons + 1)
    data = train_data._replace(
        poison_images=jnp.repeat(poisons, max_poisons + 1, axis=0),
        poison_indices=indices.reshape(v, max_poisons),
        poison_labels=jnp.full((v, max_poisons), base_class, jnp.int32),
    )
    keys = jnp.repeat(trial_keys(spec["seed"]), max_poisons + 1)
    target_of_victim = jnp.repeat(targets, max_poisons + 1, axis=0)

    def assess(args):
        victim, target = args
        probs = class_probabilities(model, victim, target[None])[0]
        ev = evaluate(model, victim, test_images, test_labels)
        f1 = f1_scores(ev["predictions"], test_labels, len(CLASS_NAMES))
        return probs, ev["accuracy"], f1

    out: dict[str, list] = {}
    for cfg in victim_cfgs:
        trained, _ = train_vmapped(model, clean_vars, data, keys, cfg)
        probs, accuracy, f1 = jax.lax.map(assess, (trained, target_of_victim))
        values = {
            "prediction": jnp.argmax(probs, -1),
            "target_prob_base": probs[:, base_class],
            "target_prob_target": probs[:, target_class],
            "accuracy": accuracy,
            "f1_base": f1[:, base_class],
            "f1_target": f1[:, target_class],
        }
        for k, val in values.items():
            out.setdefault(k, []).append(val.reshape(t, max_poisons + 1))
    result = {k: jnp.stack(val, axis=1) for k, val in out.items()}  # (T, B, N + 1)
    result["feature_distance"] = distance
    result["perturbation_linf"] = jnp.abs(poisons - bases).max(axis=(2, 3, 4))
    return result


def target_row(test_files, train_files, backbones, base_class, spec, out) -> dict:
    """A target's row: its bases, poisons' statistics and every victim's outcome."""
    return {
        "target_file": test_files[spec["target_pos"]],
        "base_files": [train_files[r] for r in spec["base_rows"]],
        "seed": int(spec["seed"]),
        "feature_distance": out["feature_distance"].tolist(),
        "perturbation_linf": out["perturbation_linf"].tolist(),
        "victims": {
            backbone: [
                {
                    "n_poisons": n,
                    "prediction": CLASS_NAMES[int(out["prediction"][b, n])],
                    "poisoned": int(out["prediction"][b, n]) == base_class,
                    **{key: float(out[key][b, n]) for key in MEANS},
                }
                for n in range(len(spec["base_rows"]) + 1)
            ]
            for b, backbone in enumerate(backbones)
        },
    }


def victim_records(rows) -> list[dict]:
    """One record per victim: its backbone setting, poison count and outcome."""
    return [
        {"backbone": b, **v} for r in rows for b, vs in r["victims"].items() for v in vs
    ]


def plot(summary, backbones, max_poisons, path) -> None:
    """Poisoned rate and the target's base-class softmax against n."""
    n = np.arange(max_poisons + 1)
    fig, axes = new_figure(1, 2, size=(9, 3.4))
    for b in backbones:
        s = [summary[f"backbone={b},n_poisons={k}"] for k in n]
        rate_errorbar(axes[0], n, s, label=b)
        axes[1].plot(n, [x["mean_target_prob_base"] for x in s], marker="o", label=b)
    axes[0].set(xlabel="poisons", ylabel="targets poisoned (%)", ylim=(-5, 105))
    axes[1].set(xlabel="poisons", ylabel="target's softmax for stop (mean)")
    for ax in axes:
        ax.legend(fontsize=8)
    save_figure(fig, path)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains the clean model, runs the targets' sweep; writes results and figure."""
    craft_cfg, victims, base_class, target_class = check_config(config)
    model = sized_model("roadsign_resnet34", len(CLASS_NAMES), config.image_size)
    data, train_rows, test_rows = load_split(config)
    train_data = make_train_data(
        data.images[train_rows], data.labels[train_rows], boxes=data.boxes[train_rows]
    )
    os.makedirs(workdir, exist_ok=True)
    clean_vars = clean_model(model, train_data, config, workdir)
    test_images, test_labels = data.images[test_rows], data.labels[test_rows]
    clean_eval = evaluate(model, clean_vars, test_images, test_labels)
    clean_pred = np.asarray(clean_eval["predictions"])
    clean_f1 = np.asarray(f1_scores(clean_pred, test_labels, len(CLASS_NAMES)))
    print(
        f"clean model: test accuracy {100 * float(clean_eval['accuracy']):.2f}% on "
        f"{len(test_rows)} images; F1 "
        + ", ".join(f"{c} {f:.3f}" for c, f in zip(CLASS_NAMES, clean_f1, strict=True))
    )
    eligible = np.flatnonzero(
        (test_labels == target_class) & (clean_pred == target_class)
    )
    bases_pool = np.flatnonzero(train_data.labels == base_class)
    files = np.asarray(data.filenames)
    backbones = tuple(victims)
    trial = Trial(
        run=functools.partial(
            cleanlabel_trials,
            model,
            craft_cfg,
            tuple(victims.values()),
            base_class,
            target_class,
        ),
        row=functools.partial(
            target_row,
            files[test_rows].tolist(),
            files[train_rows].tolist(),
            backbones,
            base_class,
        ),
    )
    rows = run_trials(
        trial,
        (train_data, clean_vars, test_images, test_labels),
        make_specs(config, eligible, bases_pool),
        chunk_size=config.chunk_size,
        workdir=workdir,
        mesh=trial_mesh(),
        desc="targets",
    )
    summary = group_summary(victim_records(rows), SETTING, "poisoned", MEANS)
    plot(summary, backbones, config.max_poisons, os.path.join(workdir, "poisoned.png"))
    result = {
        "experiment": "roadsigns_cleanlabel",
        "image_size": config.image_size,
        "train_images": len(train_rows),
        "test_images": len(test_rows),
        "clean_model": {
            "accuracy": float(clean_eval["accuracy"]),
            "f1": dict(zip(CLASS_NAMES, clean_f1.tolist(), strict=True)),
        },
        "settings": summary,
    }
    write_json(os.path.join(workdir, "summary.json"), result)
    print(table(victim_records(rows), SETTING))
    return result
