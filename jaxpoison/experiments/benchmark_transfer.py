"""The poisoning benchmark's transfer-learning table: FC, CP and BP.

Protocol of Schwarzschild et al. 2021 ("Just How Toxic is Data Poisoning?"), on its
100 CIFAR-10 setups (a target test image, 25 base training images of another class),
for one attack per run (`config.attack`; configs without the field, such as
configs/frogs_benchmark.py, run "fc"):

* "fc", feature collision, crafted as its poison_crafting/craft_poisons_fc.py:
  watermark 0.3 applied before optimisation, 120 iterations of step 0.001 with the
  reject-and-shrink rule, each poison projected into the 8/255 l_inf ball around
  its ORIGINAL base (attacks/feature_collision.py).
* "cp", Convex Polytope (Zhu et al. 2019), and "bp", Bullseye Polytope (Aghakhani
  et al. 2021), crafted as its craft_poisons_cp.py / craft_poisons_bp.py: the 25
  poisons of a setup form one polytope around the target's features, 1200 Adam
  steps (lr 0.04 in the normalised coordinates, betas 0.9 / 0.999), poisons
  starting at their bases and projected into the 8/255 ball after each step; CP
  re-solves its simplex coefficients at every step, BP fixes them at 1/25
  (attacks/polytope.py). White-box: the crafting extractor is the victim's.
* Victim: a fresh linear head on the frozen feature extractor, trained on the first
  250 training images per class (the setup's bases excluded; the base class keeps its
  first 225 and gets the 25 poisons), SGD momentum 0.9, lr 0.01, weight decay 2e-4,
  batch 128, 40 epochs, lr x0.1 at epoch 30, random crop (pad 4) + flip.
* Poisons are stored as 8-bit images (the benchmark pickles PIL images, truncating
  x * 255) and the victims train on those.
* Success: the target is classified as the base class.

A trial is a setup: crafting of its poisons and training of its victim, one jitted
program per chunk of setups (`run_trials`: each device takes its own setups). The
victims read the frozen features of every crop/flip outcome from a cache computed
once (victims/augment.py), which trains the same victims as running the extractor
on each augmented batch. Each chunk's poisons are saved with it (`poisons/`) and
exported in the benchmark's own format at the end.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxpoison.attacks import feature_collision as fc
from jaxpoison.attacks import polytope
from jaxpoison.attacks.interop import (
    merge_poisons_npz,
    save_benchmark_setups,
    save_poisons_npz,
)
from jaxpoison.data import load_cifar10
from jaxpoison.data.benchmark import load_setups, victim_rows
from jaxpoison.errors import UserInputError
from jaxpoison.experiments.common import pretrained_model, row_pool, scatter_rows
from jaxpoison.models import cifar10_weights, head_variables, load_pretrained
from jaxpoison.plots import draw_histograms, draw_rates, label, panels, save_figure
from jaxpoison.results import write_json
from jaxpoison.summaries import group_summary, rate_text
from jaxpoison.sweep import Trial, run_trials, trial_keys, trial_seeds
from jaxpoison.sweep.sharding import trial_mesh
from jaxpoison.victims import (
    TrainConfig,
    cache_features,
    make_train_data,
    train_vmapped,
)

ATTACKS = {
    "fc": "feature collision",
    "cp": "convex polytope",
    "bp": "bullseye polytope",
}
# White-box success on the CIFAR-10 transfer-learning setups, Schwarzschild et al.
# 2021, as the benchmark's README gives them since its commit d573a4b (2021-09-10;
# also at 97a67ae, the version our setups come from). The README of 2020-11-02 to
# 2021-02-19 (4516165, 75c90d0) gave FC 16%, CP 24%, BP 85%; the first one (June
# 2020) FC 16%, CP 24% and no BP.
PUBLISHED_WHITEBOX_SUCCESS = {"fc": 0.22, "cp": 0.33, "bp": 0.85}
PUBLISHED_WHITEBOX_SUCCESS_2020 = {"fc": 0.16, "cp": 0.24, "bp": 0.85}
PUBLISHED_FC_WHITEBOX_SUCCESS = PUBLISHED_WHITEBOX_SUCCESS["fc"]
ROW_FLOATS = (
    "base_class_prob",
    "clean_accuracy",
    "max_perturbation",
    "feature_distance",
    "craft_iterations",
    "train_accuracy",
)


def clean_pool_rows(subsets, base_pool_rows, pool_size: int) -> np.ndarray:
    """Pool positions that some setup trains on unpoisoned (sorted)."""
    used = np.zeros(pool_size, bool)
    for subset, bases in zip(subsets, base_pool_rows, strict=True):
        used[np.setdiff1d(subset, bases)] = True
    return np.flatnonzero(used)


def craft_fc(model, craft_cfg, shared, bases, target_images):
    """Feature collision: one poison per base, each toward its setup's target.

    Args:
      shared: the trial's shared arrays (the extractor's `variables`).
      bases: (S, B, H, W, C) in [0, 1]; target_images: (S, H, W, C).

    Returns:
      (poisons (S, B, H, W, C), per-setup measurements (S,)).
    """
    b = bases.shape[1]
    targets = jnp.repeat(target_images[:, None], b, axis=1)
    # One setup's 25 bases per crafting batch, setups in sequence inside the program:
    # on CPU, batches of 25 ran 1.3x faster per poison than one batch of 250
    # (benchmarks/crafting.py), the activations staying in cache.
    poisons, state = jax.lax.map(
        lambda bt: fc.craft(model, shared["variables"], bt[0], bt[1], craft_cfg),
        (bases, targets),
    )
    return poisons, {
        "feature_distance": state.distance.mean(axis=1),
        "craft_iterations": state.iteration.mean(axis=1),
    }


def craft_polytope(model, members, craft_cfg, shared, bases, target_images):
    """Convex / Bullseye Polytope: a setup's B poisons form one polytope around its
    target. White-box (`members` empty): the victim's extractor crafts; otherwise
    the ensemble of `members` (Models) with variables `shared["ensemble"]`. Setups
    run in sequence (`lax.map`), as for feature collision.

    Returns:
      (poisons (S, B, H, W, C), per-setup measurements (S,)): the poisons' mean
      distance to the target in the victim's features, the last objective, the
      target's relative distance to the polytope point the coefficients name, and
      how many poisons carry weight (coefficient > 1e-3; all B for BP), both
      averaged over the crafting members.
    """

    def extractor(m, v):
        return lambda x: m.apply(v, x, train=False)[1]

    victim = extractor(model, shared["variables"])
    if members:
        weights = shared["ensemble"]
        fns = [extractor(m, v) for m, v in zip(members, weights, strict=True)]
    else:
        fns = [victim]

    def one_setup(bt):
        base, target = bt
        poisons, state = polytope.craft(fns, base, target, craft_cfg)
        distance = jnp.linalg.norm(victim(poisons) - victim(target[None]), axis=-1)
        residual = polytope.polytope_residual(fns, poisons, target, state.coefficients)
        active = jnp.sum(state.coefficients > 1e-3, axis=1).astype(jnp.float32)
        return poisons, {
            "feature_distance": distance.mean(),
            "craft_iterations": state.iteration.astype(jnp.float32),
            "craft_loss": state.loss,
            "polytope_residual": residual.mean(),
            "active_poisons": active.mean(),
        }

    return jax.lax.map(one_setup, (bases, target_images))


def crafter(attack: str, model, craft_config, members=()):
    """`craft(shared, bases, target_images) -> (poisons, measurements)` and the
    names of the measurements, for `attack` ("fc", "cp" or "bp"); `members`: the
    polytope attacks' crafting ensemble (Models; empty: the victim's)."""
    if attack == "fc":
        if members:
            raise UserInputError("an ensemble is for cp and bp; fc crafts white-box")
        return functools.partial(craft_fc, model, fc.FCConfig(**craft_config)), ()
    cfg = polytope.PolytopeConfig(method=attack, **craft_config)
    extra = ("craft_loss", "polytope_residual", "active_poisons", "poisons_fit")
    return functools.partial(craft_polytope, model, tuple(members), cfg), extra


def setup_trials(model, craft, extra, victim_cfg, shared, spec):
    """One chunk of setups: craft every poison, train every victim, evaluate.

    `craft, extra = crafter(...)`; with "poisons_fit" in `extra`, also the share of
    its poisons each victim puts in the base class (a polytope only pulls the
    target over if the victim fits the poisons around it). `shared`: the pool's
    TrainData, the extractor's variables, the test features and labels, the
    training images (uint8). `spec`, one entry per setup S: target_image
    (S, H, W, C) in [0, 1], base_pool_rows and base_indices (S, B), base_class
    (S,), subset (S, M) pool rows of its victim, seed (S,).
    """
    variables = shared["variables"]
    target_images, base_class = spec["target_image"], spec["base_class"]
    s, b = spec["base_indices"].shape
    bases = shared["train_images"][spec["base_indices"]].astype(jnp.float32) / 255.0
    poisons, measured = craft(shared, bases, target_images)
    poisons, bases = (
        poisons.reshape(s * b, *poisons.shape[2:]),
        bases.reshape(s * b, *bases.shape[2:]),
    )
    # The benchmark saves poisons as 8-bit images (ToPILImage truncates x * 255) and
    # its victims train on those; truncation keeps them inside the 8/255 ball.
    poisons = jnp.floor(poisons * 255.0) / 255.0
    base_pool_rows = spec["base_pool_rows"]
    data = shared["pool"]._replace(
        poison_images=poisons.reshape(s, b, *poisons.shape[1:]),
        poison_indices=base_pool_rows,
        poison_labels=jnp.broadcast_to(base_class[:, None], base_pool_rows.shape),
        subset=spec["subset"],
    )
    keys = trial_keys(spec["seed"])
    trained, metrics = train_vmapped(model, variables, data, keys, victim_cfg)
    heads = head_variables(trained)
    target_feats = fc.target_features(model, variables, target_images)
    target_logits = jax.vmap(lambda h, f: model.apply_head(h, f[None])[0])(
        heads, target_feats
    )
    test_pred = jax.vmap(
        lambda h: jnp.argmax(model.apply_head(h, shared["test_features"]), -1)
    )(heads)
    perturbation = jnp.abs(poisons - bases).reshape(s, -1).max(axis=1)
    if "poisons_fit" in extra:
        poison_feats = model.apply(variables, poisons, train=False)[1]
        poison_pred = jax.vmap(lambda h, f: jnp.argmax(model.apply_head(h, f), -1))(
            heads, poison_feats.reshape(s, b, -1)
        )
        measured["poisons_fit"] = jnp.mean(poison_pred == base_class[:, None], axis=1)
    return {
        "prediction": jnp.argmax(target_logits, -1),
        "base_class_prob": jax.nn.softmax(target_logits)[jnp.arange(s), base_class],
        "clean_accuracy": jnp.mean(test_pred == shared["test_labels"][None], axis=1),
        "max_perturbation": perturbation,
        **measured,
        "train_accuracy": metrics["accuracy"][:, -1],
        "poisons": jnp.round(poisons * 255.0)
        .astype(jnp.uint8)
        .reshape(s, b, *poisons.shape[1:]),
    }


def setup_row(extra, spec, out) -> dict:
    """A setup's row: its classes, the victim's prediction and the measurements
    (`ROW_FLOATS`, then the attack's `extra` ones)."""
    return {
        "setup": int(spec["setup"]),
        "target_index": int(spec["target_index"]),
        "target_class": int(spec["target_class"]),
        "base_class": int(spec["base_class"]),
        "prediction": int(out["prediction"]),
        "success": bool(out["prediction"] == spec["base_class"]),
        **{k: float(out[k]) for k in (*ROW_FLOATS, *extra)},
    }


def save_poisons(index, spec, out, workdir) -> None:
    """A chunk's poisons as `poisons/setups_NNNNN.npz` (named by its first setup)."""
    del index
    save_poisons_npz(
        os.path.join(workdir, "poisons", f"setups_{int(spec['setup'][0]):05d}.npz"),
        poisons=out["poisons"],
        setup=spec["setup"],
        base_indices=spec["base_indices"],
        target_indices=spec["target_index"],
        base_class=spec["base_class"],
        target_class=spec["target_class"],
    )


def export_poisons(workdir: str, test_images: np.ndarray) -> None:
    """All chunks' poisons as one `poisons.npz`, and each setup in the benchmark's
    own format under `benchmark_format/setup_NNN/` (for its poison_test.py)."""
    merged = merge_poisons_npz(os.path.join(workdir, "poisons"))
    save_poisons_npz(os.path.join(workdir, "poisons.npz"), **merged)
    save_benchmark_setups(
        os.path.join(workdir, "benchmark_format"), merged, test_images
    )


def plot_results(rows: list[dict], summary: dict, path: str, attack: str) -> None:
    """The table as a figure: success with its 95% Wilson interval next to the
    published white-box rate of `attack`; the poisons' feature distance to their
    target; the victims' base-class probability for the target (log scale)."""
    fig, axes = panels(3, size=(4.0, 3.4))
    published = {"rate": PUBLISHED_WHITEBOX_SUCCESS[attack]}
    bars = ["this run", f"published (white-box {attack.upper()})"]
    draw_rates(axes[0], bars, [summary, published], bars=True)
    label(axes[0], f"{summary['successes']}/{summary['n']} setups", "", "success (%)")

    def by_outcome(key):
        return {
            "fail": [r[key] for r in rows if not r["success"]],
            "success": [r[key] for r in rows if r["success"]],
        }

    draw_histograms(axes[1], by_outcome("feature_distance"), bins=20, stacked=True)
    label(axes[1], "", "mean ||f(poison) - f(target)||", "setups")
    probs = by_outcome("base_class_prob")
    draw_histograms(axes[2], probs, bins=20, stacked=True, log=True)
    label(axes[2], "", "victim's base-class probability of the target", "setups")
    save_figure(fig, path)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    attack = config.get("attack", "fc")
    if attack not in ATTACKS:
        raise UserInputError(f"unknown attack {attack!r}: {', '.join(ATTACKS)}")
    victim_cfg = TrainConfig.from_mapping(config.victim)
    specs = load_setups(config.setups, config.num_setups)
    model, variables = pretrained_model(config)
    ensemble = [
        load_pretrained(name, cifar10_weights(name, config.ensemble_weights))
        for name in config.get("ensemble", ())
    ]
    craft, extra = crafter(attack, model, config.craft, [m for m, _ in ensemble])
    train = load_cifar10("train", config.data_dir or None)
    test = load_cifar10("test", config.data_dir or None)

    subsets = [
        victim_rows(train.labels, c, bases, config.per_class)
        for c, bases in zip(specs["base_class"], specs["base_indices"], strict=True)
    ]
    pool = row_pool(len(train.labels), *subsets)
    print(
        f"{len(specs['setup'])} setups; victims train on {len(subsets[0])} images "
        f"each, drawn from a shared pool of {len(pool.rows)}; caching their frozen "
        "features" + (" for every crop/flip" if victim_cfg.augment else "")
    )
    specs["subset"] = pool.at(np.stack(subsets))
    specs["base_pool_rows"] = pool.at(specs["base_indices"])
    specs["seed"] = trial_seeds(config.seed, len(specs["setup"]))
    # Targets are made on the host (numpy), as before the trial engine: XLA's f32
    # division can differ from numpy's in the last bit.
    specs["target_image"] = test.images[specs["target_index"]].astype(np.float32)
    specs["target_image"] /= 255.0

    mesh = trial_mesh()
    # Only rows some victim trains on clean need features: a setup's base rows are
    # always its poisons, and most bases are clean in no other setup (half the pool).
    clean = clean_pool_rows(specs["subset"], specs["base_pool_rows"], len(pool.rows))
    used = pool.rows[clean]
    features = cache_features(
        model,
        variables,
        make_train_data(train.images[used], train.labels[used]),
        victim_cfg,
        mesh=mesh,
    ).features
    pool_data = make_train_data(train.images[pool.rows], train.labels[pool.rows])
    shared = {
        "pool": pool_data._replace(
            features=scatter_rows(features, clean, len(pool.rows))
        ),
        "variables": variables,
        "test_features": cache_features(
            model, variables, make_train_data(test.images, test.labels), mesh=mesh
        ).features,
        "test_labels": jnp.asarray(test.labels),
        "train_images": jnp.asarray(train.images),
    }
    if ensemble:
        shared["ensemble"] = [v for _, v in ensemble]
    trial = Trial(
        run=functools.partial(setup_trials, model, craft, extra, victim_cfg),
        row=functools.partial(setup_row, extra),
        save=save_poisons,  # a committed chunk always has its poisons
    )
    rows = run_trials(
        trial,
        shared,
        specs,
        chunk_size=config.chunk_size,
        workdir=workdir,
        mesh=mesh,
        desc="setups",
    )
    export_poisons(workdir, test.images)
    success = group_summary(rows, (), means=["clean_accuracy"])["all"]
    published = PUBLISHED_WHITEBOX_SUCCESS[attack]
    summary = {
        "experiment": config.experiment,
        "attack": attack,
        "extractor": f"{config.model} pretrained on CIFAR-10",
        "success": success,
        "max_perturbation": float(np.max([r["max_perturbation"] for r in rows])),
        f"published_{attack}_whitebox_success": published,
        "published_source": "aks2203/poisoning-benchmark README, commit d573a4b",
    }
    write_json(os.path.join(workdir, "summary.json"), summary)
    plot_results(rows, success, os.path.join(workdir, "results.png"), attack)
    accuracy = 100 * success["mean_clean_accuracy"]
    print(
        f"{ATTACKS[attack]}: success {rate_text(success)} setups (published "
        f"white-box {attack.upper()}: {100 * published:.0f}%), clean accuracy "
        f"{accuracy:.2f}%"
    )
    return summary
