"""Gradient matching (Witches' Brew, Geiping et al. 2021) on the poisoning
benchmark's from-scratch setups.

Each setup of Schwarzschild et al. 2021's CIFAR-10 from-scratch file holds a target
(a test image), a base class (the adversarial class) and 500 base training images
of that class. Per setup:

1. Training set: the first `per_class` training images of every class, with the
   setup's first `num_poisons` bases among the base class's (the benchmark's
   PoisonedDataset rows, data/benchmark.py). `per_class = 5000, num_poisons = 500`
   is the whole of CIFAR-10 with the benchmark's 1% budget.
2. Surrogate: `model` trained from scratch on the clean training set (forest trains
   its brewing model clean, with the victims' schedule, before brewing).
3. Poisons: gradient matching at the surrogate (attacks/gradient_matching.py) toward
   the target's gradient for the base class, in the eps-ball around the bases,
   then stored as 8-bit images (rounded: the bases are 8-bit, so the rounded
   poisons stay inside the ball).
4. Victims: `seeds` fresh initialisations trained from scratch on the training set
   with the poisons in the bases' rows (clean labels), and, from the first
   `clean_seeds` of the same initialisations and batch orders, the same training on
   the unperturbed set: the rate at which the target goes to the base class anyway.

Success: the victim classifies the target as the base class. Reported per attack
(`gradient_matching`, `clean`): the success rate over victims with its 95% Wilson
interval, the victims' test accuracy (the target left out) and the target's
base-class probability, beside the published rate.

A run resumes in two units. Crafting (a host loop of jitted steps, a group of
setups at a time: one per device) saves each setup's poisons as they are made
(`poisons/setup_NNN.npz`); a rerun loads them. The victims are `run_trials` trials,
one per setup (all its victims), each device training its own setups.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxpoison.attacks import gradient_matching as gm
from jaxpoison.attacks.interop import save_benchmark_setups, save_poisons_npz
from jaxpoison.data import check_choice, load_cifar10
from jaxpoison.data.benchmark import load_setups, victim_rows
from jaxpoison.errors import UserInputError
from jaxpoison.experiments.common import row_pool
from jaxpoison.models import get_model
from jaxpoison.plots import draw_rates, label, panels, save_figure
from jaxpoison.results import write_json
from jaxpoison.summaries import group_summary, rate_text
from jaxpoison.sweep import Trial, run_trials, saved_arrays, trial_seeds
from jaxpoison.sweep.sharding import to_host, trial_mesh
from jaxpoison.victims import TrainConfig, evaluate, make_train_data, train_vmapped

ATTACKS = ("gradient_matching", "clean")
# Schwarzschild et al. 2021, the benchmark's README (aks2203/poisoning-benchmark,
# "From Scratch Training"): Witches' Brew against ResNet-18 victims, 100 setups,
# eps 8/255, 500 poisons (MobileNetV2 25%, VGG11 8%).
PUBLISHED_SUCCESS = 0.45
# Victims' seeds: seed + 10_000 + setup (crafting's: seed + setup).
VICTIM_SEED_OFFSET = 10_000


def check_config(config):
    """Parsed pieces; every input error is one line."""
    craft_cfg = gm.GMConfig(**config.craft)
    victim_cfg = TrainConfig.from_mapping(config.victim)
    surrogate_cfg = TrainConfig.from_mapping(config.surrogate)
    for name, cfg in (("victim", victim_cfg), ("surrogate", surrogate_cfg)):
        check_choice(cfg.mode, ("end_to_end",), f"{name}.mode (trained from scratch)")
    if min(config.num_poisons, config.num_setups, config.seeds, config.per_class) < 1:
        raise UserInputError("num_poisons, num_setups, seeds, per_class must be >= 1")
    if not 0 <= config.clean_seeds <= config.seeds:
        raise UserInputError(
            f"clean_seeds={config.clean_seeds}: 0 to seeds={config.seeds} (clean "
            "victims reuse the first poisoned victims' initialisations)"
        )
    if config.num_poisons > config.per_class:
        raise UserInputError(
            f"num_poisons={config.num_poisons} exceeds per_class={config.per_class}"
        )
    return craft_cfg, victim_cfg, surrogate_cfg


def load_setup(config, data_dir: str | None = None) -> dict:
    """The setups, every setup's training rows (as rows of a shared pool) and the
    data they read (CIFAR-10 from `data_dir`, else `config.data_dir`)."""
    specs = load_setups(config.setups, config.num_setups)
    if config.num_poisons > specs["base_indices"].shape[1]:
        raise UserInputError(
            f"num_poisons={config.num_poisons}: the setups have "
            f"{specs['base_indices'].shape[1]} bases each"
        )
    specs["base_indices"] = specs["base_indices"][:, : config.num_poisons]
    data_dir = data_dir or config.data_dir or None
    train = load_cifar10("train", data_dir)
    test = load_cifar10("test", data_dir)
    subsets = [
        victim_rows(train.labels, c, bases, config.per_class)
        for c, bases in zip(specs["base_class"], specs["base_indices"], strict=True)
    ]
    pool = row_pool(len(train.labels), *subsets)
    n_test = min(config.test_images, len(test.labels))
    specs["subset"] = pool.at(np.stack(subsets))
    specs["base_rows"] = pool.at(specs["base_indices"])
    specs["target_image"] = test.images[specs["target_index"]].astype(np.float32)
    specs["target_image"] /= 255.0
    return {
        "specs": specs,
        "images": train.images[pool.rows],
        "labels": train.labels[pool.rows].astype(np.int32),
        "test_images": test.images[:n_test],
        "test_labels": test.labels[:n_test].astype(np.int32),
        "all_test_images": test.images,  # the targets, for the benchmark's files
    }


def surrogates(model, surrogate_cfg, setup, group, keys):
    """The group's surrogates trained from scratch on their clean training sets,
    with their test accuracy and prediction for their target."""
    specs = setup["specs"]
    data = make_train_data(
        setup["images"], setup["labels"], subset=specs["subset"][group]
    )
    init_keys, train_keys = jax.vmap(jax.random.split, out_axes=1)(keys)
    inits = jax.vmap(model.init)(init_keys)
    trained = train_vmapped(
        model, inits, data, train_keys, surrogate_cfg, variables_axis=0
    )[0]

    @jax.jit
    def score(trained, targets, test_images, test_labels):
        def one(v, target):
            ev = evaluate(model, v, test_images, test_labels)
            logits = model.apply(v, target[None])[0][0]
            return ev["accuracy"], jnp.argmax(logits)

        return jax.lax.map(lambda a: one(*a), (trained, targets))

    accuracy, prediction = score(
        trained,
        jnp.asarray(specs["target_image"][group]),
        setup["test_images"],
        setup["test_labels"],
    )
    return trained, np.asarray(accuracy), np.asarray(prediction)


def craft_group(model, config, craft_cfg, surrogate_cfg, setup, group, mesh):
    """The poisons of the setups `group` (a multiple of the mesh's size), crafted
    together, as one dict of arrays per setup."""
    t0 = time.time()
    specs = setup["specs"]
    seeds = trial_seeds(config.seed, config.num_setups)[group]
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
    surrogate_keys, craft_keys = jax.vmap(jax.random.split, out_axes=1)(keys)
    trained, accuracy, prediction = surrogates(
        model, surrogate_cfg, setup, group, surrogate_keys
    )
    base_rows = specs["base_rows"][group]
    bases = jnp.asarray(setup["images"][base_rows], jnp.float32) / 255.0
    adv = jnp.asarray(specs["base_class"][group])
    targets = jnp.asarray(specs["target_image"][group])
    target_grad = jax.jit(
        jax.vmap(lambda v, t, a: gm.target_gradient(model, v, t[None], a[None]))
    )(trained, targets, adv)
    problems = gm.GMProblem(
        trained, bases, jnp.asarray(setup["labels"][base_rows]), target_grad
    )
    names = ", ".join(str(int(s)) for s in specs["setup"][group])

    def log(step, losses):
        if step % config.log_every == 0 or step == craft_cfg.steps - 1:
            best = ", ".join(f"{v:.3f}" for v in losses.min(axis=1))
            print(
                f"setups {names} craft step {step}: best restart's loss {best} "
                f"({time.time() - t0:.0f} s)"
            )

    poisons, info = gm.craft(model, problems, craft_cfg, craft_keys, log, mesh)
    poisons = to_host(poisons)  # over several processes: every process's share
    seconds = time.time() - t0
    return [
        {
            "poisons": np.asarray(poisons[i]),
            "loss": info["loss"][:, i],
            "restart": info["restart"][i],
            "surrogate_accuracy": accuracy[i],
            "surrogate_prediction": prediction[i],
            "seconds": np.float64(seconds / len(group)),
        }
        for i in range(len(group))
    ]


def craft_all(model, config, craft_cfg, surrogate_cfg, setup, workdir, mesh):
    """Every setup's poisons: loaded when saved, else crafted a group at a time
    (the group padded to the mesh's size by repeating its last setup)."""
    n, size = config.num_setups, mesh.size * config.craft_batch

    def path(s):
        return os.path.join(workdir, "poisons", f"setup_{s:03d}.npz")

    crafted = {}
    for start in range(0, n, size):
        group = list(range(start, min(start + size, n)))
        todo = [s for s in group if not os.path.exists(path(s))]
        made = {}
        if todo:
            padded = todo + [todo[-1]] * (-len(todo) % mesh.size)
            made = dict(
                zip(
                    padded,
                    craft_group(
                        model,
                        config,
                        craft_cfg,
                        surrogate_cfg,
                        setup,
                        np.array(padded),
                        mesh,
                    ),
                    strict=True,
                )
            )
        for s in group:  # saved atomically; a saved setup is loaded, never redone
            crafted[s] = saved_arrays(path(s), functools.partial(made.get, s))
    return [crafted[s] for s in range(n)]


def poisons_uint8(crafted: list[dict]) -> np.ndarray:
    """Every setup's poisons as 8-bit images, rounded: the bases are 8-bit, so the
    rounded poisons stay inside the eps-ball (truncation could leave it by 1/255)."""
    poisons = np.stack([c["poisons"] for c in crafted])
    return np.round(np.clip(poisons, 0.0, 1.0) * 255.0).astype(np.uint8)


def victim_specs(config, setup, crafted: list[dict]) -> dict[str, np.ndarray]:
    """One trial per setup; its poisons as the 8-bit images the victims read."""
    specs = dict(setup["specs"])
    specs["poisons"] = poisons_uint8(crafted).astype(np.float32) / 255.0
    specs["victim_seed"] = trial_seeds(
        config.seed, config.num_setups, offset=VICTIM_SEED_OFFSET
    )
    specs["craft_loss"] = np.array(
        [c["loss"][-1, c["restart"]] if len(c["loss"]) else np.nan for c in crafted]
    )
    for key in ("surrogate_accuracy", "surrogate_prediction"):
        specs[key] = np.array([c[key] for c in crafted])
    return specs


def score(model, trained, target, target_index, test_images, test_labels, adv):
    """Per victim (leading axis of `trained`): the target's predicted class, its
    base-class probability and the test accuracy without the target (when it is
    one of the test images)."""
    keep = jnp.arange(test_labels.shape[0]) != target_index

    def one(v):
        logits = model.apply(v, target[None])[0][0]
        preds = evaluate(model, v, test_images, test_labels)["predictions"]
        accuracy = jnp.sum((preds == test_labels) & keep) / jnp.sum(keep)
        return jnp.argmax(logits), jax.nn.softmax(logits)[adv], accuracy

    pred, prob, accuracy = jax.lax.map(one, trained)
    return {"prediction": pred, "target_base_prob": prob, "test_accuracy": accuracy}


def setup_victims(model, cfg, seeds: int, clean_seeds: int, shared, spec):
    """One setup's victims: `seeds` on the poisoned training set and the first
    `clean_seeds` of their initialisations on the clean one."""
    images, labels = shared["images"], shared["labels"]
    rows, subset = spec["base_rows"], spec["subset"]
    keys = jax.random.split(jax.random.key(spec["victim_seed"]), seeds)
    inits = jax.vmap(model.init)(keys)
    sets = {
        "gradient_matching": (
            make_train_data(
                images, labels, spec["poisons"], rows, labels[rows], subset=subset
            ),
            seeds,
        ),
        "clean": (make_train_data(images, labels, subset=subset), clean_seeds),
    }
    out = {
        "poison_linf": jnp.abs(spec["poisons"] - images[rows] / 255.0).max(),
    }
    for attack, (data, n) in sets.items():
        if not n:
            continue
        first = jax.tree.map(lambda x: x[:n], inits)  # noqa: B023
        trained = train_vmapped(model, first, data, keys[:n], cfg, variables_axis=0)[0]
        out[attack] = score(
            model,
            trained,
            spec["target_image"],
            spec["target_index"],
            shared["test_images"],
            shared["test_labels"],
            spec["base_class"],
        )
    return out


def victims_of_chunk(model, cfg, seeds, clean_seeds, shared, specs):
    """A chunk of setups, one after another (`lax.map`: end-to-end victims run
    faster in sequence than vmapped on XLA:CPU, victims/loops.py)."""
    one = functools.partial(setup_victims, model, cfg, seeds, clean_seeds, shared)
    return jax.lax.map(one, specs)


def setup_rows(seeds: int, clean_seeds: int, spec, out) -> list[dict]:
    """A setup's rows: one per (attack, victim seed)."""
    base = {
        "setup": int(spec["setup"]),
        "target_index": int(spec["target_index"]),
        "target_class": int(spec["target_class"]),
        "base_class": int(spec["base_class"]),
        "craft_loss": float(spec["craft_loss"]),
        "surrogate_accuracy": float(spec["surrogate_accuracy"]),
        "surrogate_success": bool(spec["surrogate_prediction"] == spec["base_class"]),
    }
    rows = []
    for attack, n in (("gradient_matching", seeds), ("clean", clean_seeds)):
        for s in range(n):
            r = out[attack]
            rows.append(
                {
                    **base,
                    "attack": attack,
                    "seed": s,
                    "prediction": int(r["prediction"][s]),
                    "success": bool(r["prediction"][s] == spec["base_class"]),
                    "target_base_prob": float(r["target_base_prob"][s]),
                    "test_accuracy": float(r["test_accuracy"][s]),
                    "poison_linf": float(out["poison_linf"])
                    if attack == "gradient_matching"
                    else 0.0,
                }
            )
    return rows


def export_poisons(workdir: str, setup: dict, crafted: list[dict]) -> None:
    """Every setup's 8-bit poisons as `poisons.npz`, and in the benchmark's own
    format (`benchmark_format/setup_NNN/`, as forest's `--save benchmark` writes
    them) for its `benchmark_test.py --from_scratch`."""
    specs = setup["specs"]
    arrays = {
        "poisons": poisons_uint8(crafted),
        "setup": specs["setup"],
        "base_indices": specs["base_indices"],
        "target_indices": specs["target_index"],
        "base_class": specs["base_class"],
        "target_class": specs["target_class"],
    }
    save_poisons_npz(os.path.join(workdir, "poisons.npz"), **arrays)
    save_benchmark_setups(
        os.path.join(workdir, "benchmark_format"), arrays, setup["all_test_images"]
    )


def plot_results(summary: dict, crafted: list[dict], path: str) -> None:
    """Success with its 95% Wilson interval per attack beside the published rate;
    the kept restart's crafting loss per setup."""
    fig, axes = panels(2, size=(4.2, 3.4))
    results = summary["results"]
    names = [k for k in (f"attack={a}" for a in ATTACKS) if k in results]
    bars = [n.split("=")[1] for n in names] + ["published (ResNet-18)"]
    draw_rates(
        axes[0],
        bars,
        [results[n] for n in names] + [{"rate": PUBLISHED_SUCCESS}],
        bars=True,
    )
    label(axes[0], "target -> base class", "", "victims (%)")
    for s, c in enumerate(crafted):
        if len(c["loss"]):
            axes[1].plot(c["loss"][:, int(c["restart"])], lw=0.8, label=f"setup {s}")
    label(axes[1], "kept restart", "craft step", "1 - cos(g_target, g_poisons)")
    save_figure(fig, path)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Crafts every setup's poisons, then trains and scores the victims."""
    t0 = time.time()
    craft_cfg, victim_cfg, surrogate_cfg = check_config(config)
    model = get_model(config.model)
    setup = load_setup(config)
    mesh = trial_mesh()
    n_train = setup["specs"]["subset"].shape[1]
    print(
        f"{config.num_setups} setups; {config.model} victims train from scratch on "
        f"{n_train} images with {config.num_poisons} poisons "
        f"({100 * config.num_poisons / n_train:.2f}%), eps "
        f"{255 * craft_cfg.epsilon:.3g}/255"
    )
    crafted = craft_all(model, config, craft_cfg, surrogate_cfg, setup, workdir, mesh)
    craft_seconds = time.time() - t0
    shared = {
        "images": setup["images"],
        "labels": setup["labels"],
        "test_images": setup["test_images"],
        "test_labels": setup["test_labels"],
    }
    trial = Trial(
        run=functools.partial(
            victims_of_chunk, model, victim_cfg, config.seeds, config.clean_seeds
        ),
        row=functools.partial(setup_rows, config.seeds, config.clean_seeds),
    )
    rows = run_trials(
        trial,
        shared,
        victim_specs(config, setup, crafted),
        chunk_size=config.chunk_size,
        workdir=workdir,
        mesh=mesh,
        desc="setups",
    )
    results = group_summary(
        rows, ["attack"], means=["test_accuracy", "target_base_prob"]
    )
    surrogate = [c["surrogate_accuracy"] for c in crafted]
    summary = {
        "experiment": "gradient_matching",
        "model": config.model,
        "train_images": int(n_train),
        "num_poisons": int(config.num_poisons),
        "epsilon": float(craft_cfg.epsilon),
        "results": results,
        "surrogate_test_accuracy": float(np.mean(surrogate)),
        "max_poison_linf": float(max(r["poison_linf"] for r in rows)),
        "published_success_resnet18": PUBLISHED_SUCCESS,
        "craft_seconds": craft_seconds,
        "wall_seconds": time.time() - t0,
    }
    write_json(os.path.join(workdir, "summary.json"), summary)
    export_poisons(workdir, setup, crafted)
    plot_results(summary, crafted, os.path.join(workdir, "success.png"))
    for key, s in results.items():
        print(
            f"{key:26s} success {rate_text(s)} victims, test accuracy "
            f"{100 * s['mean_test_accuracy']:.1f}%, target's base-class probability "
            f"{s['mean_target_base_prob']:.3f}"
        )
    print(
        f"published (Schwarzschild et al. 2021, ResNet-18, full size): "
        f"{100 * PUBLISHED_SUCCESS:.0f}%; surrogate test accuracy "
        f"{100 * np.mean(surrogate):.1f}%"
    )
    return summary
