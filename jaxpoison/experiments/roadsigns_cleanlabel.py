"""Clean-label Poison Frogs on road signs: the replication study's protocol.

A ResNet-34-style network with two heads (4-way classification and bounding-box
regression, L1 box loss x 1/1000) is trained on the Kaggle road-sign images (the
largest object of each image gives its class and box). The attack: base class stop,
target class traffic light. Per target (a held-out traffic-light image the clean
model classifies correctly), poisons are crafted with Algorithm 1 (feature collision
in the pooled 512-d features of the clean model) from stop-sign training images and
enter the training set with their clean labels (stop) and boxes; the victim
retrains from the clean model with the backbone FROZEN (only the two heads train)
or UNFROZEN (every layer), with 0, 1, 2, 3, 4 poisons "added one at a time" (the
n-poison victim has the first n bases replaced by their poisons; every victim
trains on the same rows).

The study's table, per (backbone, n): model accuracy on the held-out images, F1 of
the base (stop) and target (traffic light) classes, the target's softmax for both,
and whether it is poisoned (classified as stop). Here over several targets, with
Wilson intervals on the poisoned rate.

The clean model is trained once per workdir and saved (`clean_model.msgpack`), so a
rerun resumes without retraining; the targets' sweep is chunked and resumable.
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
from jaxpoison.data import split_fractions
from jaxpoison.data.roadsigns import CLASS_NAMES, load_roadsigns
from jaxpoison.errors import UserInputError
from jaxpoison.models import get_model
from jaxpoison.results import atomic_write_bytes, rate_summary, write_json, write_jsonl
from jaxpoison.sweep import run_chunks
from jaxpoison.victims import TrainConfig, evaluate, make_train_data, train_vmapped
from jaxpoison.victims.train import train

BACKBONES = ("frozen", "unfrozen")


def f1_scores(predictions, labels, num_classes: int) -> jax.Array:
    """Per-class F1 = 2 TP / (2 TP + FP + FN); 0 where a class never occurs in
    either (no TP, FP or FN). Pure; vmaps over victims."""
    classes = jnp.arange(num_classes)[:, None]
    pred = predictions[None] == classes
    true = labels[None] == classes
    tp = jnp.sum(pred & true, axis=1)
    fp = jnp.sum(pred & ~true, axis=1)
    fn = jnp.sum(~pred & true, axis=1)
    denom = 2 * tp + fp + fn
    return jnp.where(denom > 0, 2 * tp / jnp.maximum(denom, 1), 0.0)


def cleanlabel_trials(
    model,
    craft_cfg: fc.FCConfig,
    victim_cfgs: tuple[TrainConfig, ...],
    max_poisons: int,
    base_class: int,
    target_class: int,
    train_data,
    clean_vars,
    test_images,
    test_labels,
    targets,
    base_rows,
    seed,
):
    """T targets: craft `max_poisons` poisons each; train (backbone x n) victims.

    Returns per-victim arrays (B, T, N+1) for B backbones and n = 0..N, and the
    crafting statistics (T, N).
    """
    t = targets.shape[0]
    dtype = train_data.poison_images.dtype
    bases = train_data.images[base_rows].astype(dtype) / 255.0  # (T, N, H, W, C)
    flat = bases.reshape(t * max_poisons, *bases.shape[2:])
    poisons, state = fc.craft(
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
    keys = jnp.repeat(jax.vmap(jax.random.key)(seed), max_poisons + 1)
    target_of_victim = jnp.repeat(targets, max_poisons + 1, axis=0)
    out: dict[str, list] = {}
    for cfg in victim_cfgs:
        trained, _ = train_vmapped(model, clean_vars, data, keys, cfg)

        def assess(args):
            vars_, target = args
            logits = model.apply(vars_, target[None])[0]["class"][0]
            ev = evaluate(model, vars_, test_images, test_labels)
            f1 = f1_scores(ev["predictions"], test_labels, len(CLASS_NAMES))
            return jax.nn.softmax(logits), ev["accuracy"], f1

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
    result = {k: jnp.stack(val) for k, val in out.items()}
    result["feature_distance"] = distance
    result["perturbation_linf"] = jnp.abs(poisons - bases).max(axis=(2, 3, 4))
    result["craft_iterations"] = state.iteration.reshape(t, max_poisons)
    return result


def load_split(config):
    """Road-sign images at `config.image_size`, split train/test (seeded)."""
    if not config.manual_dir and not config.data_dir:
        raise UserInputError(
            "road signs need manual_dir (the Kaggle layout, e.g. "
            "../shared/data/roadsigns) or a data_dir where road_signs is prepared"
        )
    data = load_roadsigns(
        config.data_dir or None, config.manual_dir or None, config.image_size
    )
    train_rows, test_rows = split_fractions(
        len(data.labels), (1 - config.test_fraction, config.test_fraction), config.seed
    )
    return data, train_rows, test_rows


def clean_model(model, data, train_rows, config, workdir):
    """The clean two-head model, trained from scratch once and saved in `workdir`."""
    path = os.path.join(workdir, "clean_model.msgpack")
    template = model.init(jax.random.key(config.seed))
    if os.path.exists(path):
        with open(path, "rb") as f:
            return flax.serialization.from_bytes(template, f.read())
    cfg = TrainConfig.from_mapping(config.clean_training)
    print(
        f"training the clean {model.name} from scratch on {len(train_rows)} images "
        f"({cfg.epochs} epochs)"
    )
    train_data = make_train_data(
        data.images[train_rows], data.labels[train_rows], boxes=data.boxes[train_rows]
    )
    trained, metrics = train(
        model, template, train_data, jax.random.key(config.seed + 1), cfg
    )
    print(f"clean model: final training accuracy {float(metrics['accuracy'][-1]):.3f}")
    atomic_write_bytes(path, flax.serialization.to_bytes(trained))
    return trained


def check_config(config):
    craft_cfg = fc.FCConfig(**config.craft)
    victims = {}
    for backbone in config.backbones:
        if backbone not in BACKBONES:
            raise UserInputError(
                f"unknown backbone setting {backbone!r}: {', '.join(BACKBONES)}"
            )
        mode = "linear" if backbone == "frozen" else "end_to_end"
        victims[backbone] = TrainConfig.from_mapping(
            {**config.victim[backbone], "mode": mode}
        )
    if not victims:
        raise UserInputError("config.backbones is empty: frozen and/or unfrozen")
    if config.max_poisons < 1 or config.num_targets < 1:
        raise UserInputError("max_poisons and num_targets must be >= 1")
    for name in ("base_class", "target_class"):
        if config[name] not in CLASS_NAMES:
            raise UserInputError(
                f"{name} {config[name]!r} unknown; classes: {', '.join(CLASS_NAMES)}"
            )
    if config.base_class == config.target_class:
        raise UserInputError("base_class and target_class must differ")
    return craft_cfg, victims


def summarise(rows, backbones, max_poisons) -> dict:
    out = {}
    for b in backbones:
        for n in range(max_poisons + 1):
            sel = [r["victims"][b][n] for r in rows]
            out[f"{b}/n={n}"] = {
                "poisoned": rate_summary(v["poisoned"] for v in sel),
                **{
                    key: float(np.mean([v[key] for v in sel]))
                    for key in (
                        "accuracy",
                        "f1_base",
                        "f1_target",
                        "target_prob_base",
                        "target_prob_target",
                    )
                },
            }
    return out


def plot(summary, backbones, max_poisons, path) -> None:
    """Poisoned rate and the target's base-class softmax against n."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = np.arange(max_poisons + 1)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for b in backbones:
        s = [summary[f"{b}/n={k}"] for k in n]
        rate = np.array([x["poisoned"]["rate"] for x in s]) * 100
        err = np.array(
            [
                [
                    100 * x["poisoned"]["rate"] - 100 * x["poisoned"]["ci95_low"]
                    for x in s
                ],
                [
                    100 * x["poisoned"]["ci95_high"] - 100 * x["poisoned"]["rate"]
                    for x in s
                ],
            ]
        )
        axes[0].errorbar(n, rate, yerr=err, marker="o", capsize=3, label=b)
        axes[1].plot(n, [x["target_prob_base"] for x in s], marker="o", label=b)
    axes[0].set(xlabel="poisons", ylabel="targets poisoned (%)", ylim=(-5, 105))
    axes[1].set(xlabel="poisons", ylabel="target's softmax for stop (mean)")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains the clean model, runs the targets' sweep; writes results and figure."""
    craft_cfg, victims = check_config(config)
    base_class = CLASS_NAMES.index(config.base_class)
    target_class = CLASS_NAMES.index(config.target_class)
    model = get_model("roadsign_resnet34", image_size=config.image_size)
    data, train_rows, test_rows = load_split(config)
    os.makedirs(workdir, exist_ok=True)
    clean_vars = clean_model(model, data, train_rows, config, workdir)
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
    bases_pool = np.flatnonzero(data.labels[train_rows] == base_class)
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
    target_pos = np.sort(rng.choice(eligible, config.num_targets, replace=False))
    specs = {
        "target_pos": target_pos.astype(np.int32),
        "base_rows": np.stack(
            [
                rng.choice(bases_pool, config.max_poisons, replace=False)
                for _ in target_pos
            ]
        ).astype(np.int32),
        "seed": (np.arange(len(target_pos)) + config.seed).astype(np.int32),
    }
    train_data = make_train_data(
        data.images[train_rows], data.labels[train_rows], boxes=data.boxes[train_rows]
    )
    backbones = tuple(victims)
    fn = jax.jit(
        functools.partial(
            cleanlabel_trials,
            model,
            craft_cfg,
            tuple(victims.values()),
            int(config.max_poisons),
            base_class,
            target_class,
        )
    )

    def trial_rows(chunk):
        targets = jnp.asarray(test_images[chunk["target_pos"]], jnp.float32) / 255.0
        out = jax.device_get(
            fn(
                train_data,
                clean_vars,
                test_images,
                test_labels,
                targets,
                jnp.asarray(chunk["base_rows"]),
                jnp.asarray(chunk["seed"]),
            )
        )
        rows = []
        for i in range(len(chunk["seed"])):
            row = {
                "target_file": data.filenames[test_rows[chunk["target_pos"][i]]],
                "base_files": [
                    data.filenames[train_rows[r]] for r in chunk["base_rows"][i]
                ],
                "seed": int(chunk["seed"][i]),
                "feature_distance": out["feature_distance"][i].tolist(),
                "perturbation_linf": out["perturbation_linf"][i].tolist(),
                "victims": {},
            }
            for b, backbone in enumerate(backbones):
                row["victims"][backbone] = [
                    {
                        "n_poisons": n,
                        "prediction": CLASS_NAMES[int(out["prediction"][b, i, n])],
                        "poisoned": int(out["prediction"][b, i, n]) == base_class,
                        **{
                            key: float(out[key][b, i, n])
                            for key in (
                                "accuracy",
                                "f1_base",
                                "f1_target",
                                "target_prob_base",
                                "target_prob_target",
                            )
                        },
                    }
                    for n in range(config.max_poisons + 1)
                ]
            rows.append(row)
        return rows

    rows = run_chunks(
        trial_rows, specs, config.chunk_size, os.path.join(workdir, "sweep"), "targets"
    )
    write_jsonl(os.path.join(workdir, "results.jsonl"), rows)
    summary = summarise(rows, backbones, config.max_poisons)
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
    print("backbone  n  poisoned        accuracy  F1 stop  F1 light  p(stop|target)")
    for key, s in summary.items():
        p = s["poisoned"]
        print(
            f"{key:12s} {p['successes']}/{p['n']} [{100 * p['ci95_low']:.0f}, "
            f"{100 * p['ci95_high']:.0f}]%  {100 * s['accuracy']:.1f}%  "
            f"{s['f1_base']:.3f}  {s['f1_target']:.3f}  {s['target_prob_base']:.3f}"
        )
    return result
