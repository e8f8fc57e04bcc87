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

A run resumes in two units. Crafting (a host loop of jitted calls, one per
surrogate: nothing a trial's `run` can jit) goes first, target by target, each
target's poisons saved as they are made (`poisons/target_NNN.npz`, atomically,
by `sweep.saved_arrays`); a rerun loads them. The victims are `run_trials`
trials, one per (target, attack), one chunk per target, each a row per (victim,
seed).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxpoison.attacks import feature_collision as fc
from jaxpoison.attacks import metapoison as mp
from jaxpoison.data import (
    CIFAR10_CLASSES,
    check_choice,
    check_classes,
    check_distinct,
    first_k_per_class,
    load_dataset,
)
from jaxpoison.errors import UserInputError
from jaxpoison.models import load_pretrained, shipped_weights
from jaxpoison.plots import new_figure, save_figure
from jaxpoison.results import write_json
from jaxpoison.summaries import group_summary, rate_text
from jaxpoison.sweep import Trial, run_trials, saved_arrays, trial_keys, trial_seeds
from jaxpoison.sweep.sharding import trial_mesh
from jaxpoison.victims import TrainConfig, evaluate, make_train_data, train_vmapped

DATASETS = ("cifar10", "cifar10_sample")
ATTACKS = ("clean", "metapoison", "frogs")
VICTIM_SEED_OFFSET = (
    10_000  # victims' seeds: seed + 10_000 + target (crafting's: + target)
)


def check_config(config):
    """Parsed pieces; every input error is one line."""
    check_choice(config.dataset, DATASETS, "dataset")
    classes = (config.target_class, config.poison_class)
    check_classes(classes, len(CIFAR10_CLASSES), "class")
    check_distinct(classes, "target_class and poison_class")
    if min(config.num_poisons, config.num_targets, config.seeds, config.per_class) < 1:
        raise UserInputError("num_poisons, num_targets, seeds, per_class must be >= 1")
    if config.num_poisons > config.per_class:
        raise UserInputError(
            f"num_poisons={config.num_poisons}: the bases are the first images of "
            f"the poison class in the subset, per_class={config.per_class}"
        )
    frogs_cfg = fc.FCConfig(**config.frogs)
    victims = {name: TrainConfig.from_mapping(v) for name, v in config.victims.items()}
    for name in victims:
        check_choice(name, ("finetune", "scratch"), "victim")
    for name in config.craft_for:
        check_choice(name, tuple(victims), "victim in craft_for")
    return craftings(config, victims), frogs_cfg, victims


def craftings(config, victims) -> dict[str, tuple[mp.MetaPoisonConfig, tuple]]:
    """MetaPoison's crafting runs: {name: (config, victim kinds it poisons)}.

    Victim kind k's poisons are crafted with `config.craft` updated by
    `config.craft_for[k]` (e.g. surrogates fine-tuned from the pretrained weights
    for the fine-tuned victims, trained from scratch for the from-scratch ones).
    Kinds with the same settings share one run, named "metapoison" when there is
    a single run, else "metapoison_<first kind>".
    """
    runs: dict[mp.MetaPoisonConfig, list[str]] = {}
    for kind in victims:
        cfg = mp.MetaPoisonConfig(
            **{**config.craft, **dict(config.craft_for.get(kind, {}))}
        )
        runs.setdefault(cfg, []).append(kind)
    if len(runs) == 1:
        ((cfg, kinds),) = runs.items()
        return {"metapoison": (cfg, tuple(kinds))}
    return {
        f"metapoison_{kinds[0]}": (cfg, tuple(kinds)) for cfg, kinds in runs.items()
    }


def crafting_of(crafts: dict, kind: str) -> str:
    """The name of the crafting run that poisons victim kind `kind`."""
    return next(name for name, (_, kinds) in crafts.items() if kind in kinds)


def load_setup(config) -> dict:
    """The training subset, the bases' rows, the targets and the test images."""
    data_dir = config.data_dir or None
    train_set = load_dataset(config.dataset, "train", data_dir)
    test_set = load_dataset(config.dataset, "test", data_dir)
    # The authors' truncated_cifar10 sorts the subset by label.
    rows = first_k_per_class(train_set.labels, config.per_class, class_order=True)
    labels = train_set.labels[rows].astype(np.int32)
    base_rows = np.flatnonzero(labels == config.poison_class)[: config.num_poisons]
    pool = np.flatnonzero(test_set.labels == config.target_class)
    if config.target_id + config.num_targets > len(pool):
        raise UserInputError(
            f"target_id + num_targets = {config.target_id + config.num_targets}: "
            f"only {len(pool)} test images of class {config.target_class}"
        )
    target_rows = pool[config.target_id : config.target_id + config.num_targets]
    images = train_set.images[rows]
    n_test = min(config.test_images, len(test_set.labels))
    return {
        "images": images,
        "labels": labels,
        "base_rows": base_rows.astype(np.int32),
        "clean_rows": np.setdiff1d(np.arange(len(labels)), base_rows),
        "bases": images[base_rows].astype(np.float32) / 255.0,
        "target_rows": target_rows.astype(np.int32),
        "targets": test_set.images[target_rows].astype(np.float32) / 255.0,
        "test_images": test_set.images[:n_test],
        "test_labels": test_set.labels[:n_test].astype(np.int32),
    }


def craft_target(model, pretrained, setup, t, config, crafts, frogs_cfg):
    """MetaPoison's poisons of every crafting run and Poison Frogs' for target `t`,
    and each MetaPoison run's crafting history, as arrays."""
    bases, target = setup["bases"], setup["targets"][t : t + 1]
    base_rows = setup["base_rows"]
    problem = mp.CraftProblem(
        images=setup["images"],
        labels=setup["labels"],
        clean_rows=setup["clean_rows"],
        bases=bases,
        base_labels=setup["labels"][base_rows],
        targets=target,
        adv_labels=np.array([config.poison_class], np.int32),
    )
    t0 = time.time()
    seed = int(trial_seeds(config.seed, config.num_targets)[t])
    out = {}
    for name, (craft_cfg, _) in crafts.items():
        label = "" if len(crafts) == 1 else f" ({name})"

        def log(h, label=label):
            if h["craft_step"] % config.log_every == 0:
                print(
                    f"target {t}{label} craft step {h['craft_step']}: adversarial "
                    f"loss {h['adversarial_loss']:.3f} (surrogate epochs "
                    f"{h['surrogate_epochs']}), {time.time() - t0:.0f} s"
                )

        meta, info = mp.craft(
            model, pretrained, problem, craft_cfg, jax.random.key(seed), log=log
        )
        history = "history" if len(crafts) == 1 else f"history_{name}"
        out[name] = np.asarray(meta)
        out[history] = np.array(json.dumps(info["history"]))  # text: no pickle
    frogs, _ = fc.craft(
        model,
        pretrained,
        jnp.asarray(bases),
        jnp.broadcast_to(jnp.asarray(target), bases.shape),
        frogs_cfg,
    )
    return {**out, "frogs": np.asarray(frogs)}


def victim_specs(config, setup, crafted: list[dict], crafts, kinds):
    """One trial per (target, attack), targets outermost; poisons (victim kinds
    first: MetaPoison's are crafted per kind) as 8-bit images when `poison_8bit`
    (they enter a dataset so)."""

    def poisons_of(arrays, attack, kind):
        if attack == "clean":
            return setup["bases"]
        return arrays[crafting_of(crafts, kind) if attack == "metapoison" else attack]

    poisons = []
    for arrays in crafted:
        for attack in ATTACKS:
            p = jnp.stack(
                [jnp.asarray(poisons_of(arrays, attack, kind)) for kind in kinds]
            )
            if config.poison_8bit:
                p = jnp.round(p * 255.0) / 255.0
            poisons.append(np.asarray(p))
    each = functools.partial(np.repeat, repeats=len(ATTACKS), axis=0)
    seeds = trial_seeds(config.seed, config.num_targets, offset=VICTIM_SEED_OFFSET)
    return {
        "target": each(np.arange(config.num_targets, dtype=np.int32)),
        "target_row": each(setup["target_rows"]),
        "attack": np.tile(np.array(ATTACKS), config.num_targets),
        "poisons": np.stack(poisons),
        "target_image": each(setup["targets"]),
        "victim_seed": each(seeds),
    }


def score(model, trained, target, target_row, test_images, test_labels, adv: int):
    """Per victim (leading axis of `trained`): the target's predicted class, its CW
    margin toward `adv` (negative = success) and the test accuracy without the
    target (when it is one of the test images)."""
    keep = jnp.arange(test_labels.shape[0]) != target_row

    def one(v):
        logits = model.apply(v, target[None])[0]
        margin = mp.adversarial_loss(logits, jnp.array([adv]), "cw")
        preds = evaluate(model, v, test_images, test_labels)["predictions"]
        accuracy = jnp.sum((preds == test_labels) & keep) / jnp.sum(keep)
        return jnp.argmax(logits[0]), margin, accuracy

    # One victim after another: vmapping `one` over the victims' weights makes
    # grouped convolutions. On one device, `python benchmarks/stacked_evaluation.py
    # --images 2000 --repeats 1` took 46.8 s vmapped, 10.2 s mapped, same
    # predictions. In the default run's victims (one core per device) the wall time
    # did not change, but peak RSS fell 5.1 -> 3.3 GB and system time 151 -> 24 s.
    pred, margin, accuracy = jax.lax.map(one, trained)
    return {"prediction": pred, "cw_margin": margin, "test_accuracy": accuracy}


def trial_victims(model, victim_cfgs, seeds: int, adv: int, shared, spec, key):
    """One (target, attack) trial: `seeds` victims of each kind on the subset with
    the trial's poisons for that kind in the bases' rows (keys split from the
    trial's key)."""
    images, labels, rows = shared["images"], shared["labels"], shared["base_rows"]
    keys = jax.random.split(key, seeds)
    linf = jnp.abs(spec["poisons"] - shared["bases"][None]).max(axis=(1, 2, 3, 4))
    out = {"poison_linf": linf}
    for k, (kind, cfg) in enumerate(victim_cfgs.items()):
        data = make_train_data(images, labels, spec["poisons"][k], rows, labels[rows])
        if kind == "finetune":
            trained = train_vmapped(model, shared["variables"], data, keys, cfg)[0]
        else:
            inits = jax.vmap(model.init)(keys)
            trained = train_vmapped(model, inits, data, keys, cfg, variables_axis=0)[0]
        out[kind] = score(
            model,
            trained,
            spec["target_image"],
            spec["target_row"],
            shared["test_images"],
            shared["test_labels"],
            adv,
        )
    return out


def poisoned_victims(model, victim_cfgs, seeds: int, adv: int, shared, specs):
    """A chunk of trials, one after another (`lax.map`: end-to-end victims run
    several times faster in sequence than vmapped on XLA:CPU, victims/loops.py)."""
    one = functools.partial(trial_victims, model, victim_cfgs, seeds, adv, shared)
    keys = trial_keys(specs["victim_seed"])
    return jax.lax.map(lambda x: one(*x), (specs, keys))


def victim_rows(kinds, seeds: int, adv: int, spec, out) -> list[dict]:
    """A trial's rows: one per (victim kind, seed)."""
    return [
        {
            "target": int(spec["target"]),
            "target_row": int(spec["target_row"]),
            "attack": str(spec["attack"]),
            "victim": kind,
            "seed": s,
            "prediction": int(out[kind]["prediction"][s]),
            "success": bool(out[kind]["prediction"][s] == adv),
            "cw_margin": float(out[kind]["cw_margin"][s]),
            "test_accuracy": float(out[kind]["test_accuracy"][s]),
            "poison_linf": float(out["poison_linf"][k]),
        }
        for k, kind in enumerate(kinds)
        for s in range(seeds)
    ]


def verdict(results: dict, kinds: tuple[str, ...]) -> dict:
    """Per victim kind: whether MetaPoison's success rate is above the clean bases'
    (the 95% Wilson intervals do not overlap), and how far its mean CW margin lies
    below theirs (negative: toward the adversarial class)."""
    out = {}
    for kind in kinds:
        meta = results[f"attack=metapoison,victim={kind}"]
        clean = results[f"attack=clean,victim={kind}"]
        out[kind] = {
            "above_clean": bool(meta["ci95_low"] > clean["ci95_high"]),
            "margin_drop": meta["mean_cw_margin"] - clean["mean_cw_margin"],
        }
    return out


def plot_craft_history(
    histories: list[list[dict]], labels: list[str], objective: str, path: str
):
    """The ensemble's adversarial loss over craft steps, one line per target and
    crafting run."""
    if not any(histories):
        return
    fig, ax = new_figure()
    for label, history in zip(labels, histories, strict=True):
        ax.plot([h["adversarial_loss"] for h in history], label=label)
    ax.set_xlabel("craft step")
    ax.set_ylabel(f"ensemble mean adversarial loss ({objective})")
    ax.legend()
    save_figure(fig, path)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Crafts every target's poisons, then trains and scores the victims."""
    t0 = time.time()
    crafts, frogs_cfg, victim_cfgs = check_config(config)
    model, pretrained = load_pretrained(
        config.model, config.weights or shipped_weights(config.model)
    )
    setup = load_setup(config)
    crafted = [
        saved_arrays(
            os.path.join(workdir, "poisons", f"target_{t:03d}.npz"),
            functools.partial(
                craft_target, model, pretrained, setup, t, config, crafts, frogs_cfg
            ),
        )
        for t in range(config.num_targets)
    ]
    shared = {**setup, "variables": pretrained}
    adv = config.poison_class
    trial = Trial(
        run=functools.partial(poisoned_victims, model, victim_cfgs, config.seeds, adv),
        row=functools.partial(victim_rows, tuple(victim_cfgs), config.seeds, adv),
    )
    rows = run_trials(
        trial,
        shared,
        victim_specs(config, setup, crafted, crafts, tuple(victim_cfgs)),
        chunk_size=len(ATTACKS),  # one target per chunk
        workdir=workdir,
        mesh=trial_mesh(),
        desc="victims",
    )
    names = [k for k in crafted[0] if k.startswith("history")] if crafted else []
    histories = [json.loads(str(a[k])) for a in crafted for k in names]
    labels = [
        f"target {t}" + k.removeprefix("history").replace("_", " ")
        for t in range(len(crafted))
        for k in names
    ]
    objective = next(iter(crafts.values()))[0].objective
    plot_craft_history(
        histories, labels, objective, os.path.join(workdir, "craft_loss.png")
    )
    results = group_summary(
        rows, ["attack", "victim"], means=["test_accuracy", "cw_margin"]
    )
    summary = {
        "experiment": "metapoison",
        "train_images": int(len(setup["labels"])),
        "results": results,
        "verdict": verdict(results, tuple(victim_cfgs)),
        "craft_history": histories,
        "craft_history_labels": labels,
        "craftings": {
            name: {"victims": list(kinds), **dataclasses.asdict(cfg)}
            for name, (cfg, kinds) in crafts.items()
        },
        "wall_seconds": time.time() - t0,
    }
    write_json(os.path.join(workdir, "summary.json"), summary)
    for kind, v in summary["verdict"].items():
        print(
            f"{kind} victims: MetaPoison's success above the clean bases' (95% "
            f"intervals apart): {v['above_clean']}; CW margin MetaPoison - clean "
            f"{v['margin_drop']:+.2f}"
        )
    for key, s in summary["results"].items():
        print(
            f"{key:30s} success {rate_text(s)}, test accuracy "
            f"{100 * s['mean_test_accuracy']:.1f}%, CW margin {s['mean_cw_margin']:.2f}"
        )
    return summary
