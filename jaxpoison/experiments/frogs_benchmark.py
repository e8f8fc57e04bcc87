"""The poisoning benchmark's transfer-learning table for feature collision.

Protocol of Schwarzschild et al. 2021 ("Just How Toxic is Data Poisoning?"), on its
100 CIFAR-10 setups (a target test image, 25 base training images of another class):

* Crafting as its poison_crafting/craft_poisons_fc.py: watermark 0.3 applied before
  optimisation, 120 iterations of step 0.001 with the reject-and-shrink rule, each
  poison projected into the 8/255 l_inf ball around its ORIGINAL base.
* Victim: a fresh linear head on the frozen feature extractor, trained on the first
  250 training images per class (the setup's bases excluded; the base class keeps its
  first 225 and gets the 25 poisons), SGD momentum 0.9, lr 0.01, weight decay 2e-4,
  batch 128, 40 epochs, lr x0.1 at epoch 30, random crop (pad 4) + flip.
* Poisons are stored as 8-bit images (the benchmark pickles PIL images, truncating
  x * 255) and the victims train on those.
* Success: the target is classified as the base class.

Everything for a chunk of setups (crafting of all their poisons and all their victims)
is one jitted program; the victims read the frozen features of every crop/flip outcome
from a cache computed once (victims/augment.py), which trains the same victims as
running the extractor on each augmented batch.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxpoison.attacks import feature_collision as fc
from jaxpoison.attacks.interop import (
    load_poisons_npz,
    save_benchmark_format,
    save_poisons_npz,
)
from jaxpoison.data import load_cifar10
from jaxpoison.errors import UserInputError
from jaxpoison.models import head_variables, load_pretrained, shipped_weights
from jaxpoison.results import rate_summary, write_json
from jaxpoison.sweep import run_chunks
from jaxpoison.sweep.sharding import (
    per_device,
    replicate,
    shard_trials,
    to_host,
    trial_mesh,
)
from jaxpoison.victims import (
    TrainConfig,
    cache_features,
    make_train_data,
    train_vmapped,
)

SETUPS = os.path.join(
    os.path.dirname(__file__),
    "..",
    "assets",
    "benchmark_cifar10_transfer_learning.json",
)


def load_setups(path: str, num_setups: int) -> dict[str, np.ndarray]:
    """The benchmark's setups as arrays: target index/class, base class, bases."""
    path = path or SETUPS
    if not os.path.isfile(path):
        raise UserInputError(f"setups file not found: {path}")
    with open(path) as f:
        setups = json.load(f)
    if not 1 <= num_setups <= len(setups):
        raise UserInputError(f"num_setups={num_setups}: the file has {len(setups)}")
    setups = setups[:num_setups]
    return {
        "setup": np.arange(num_setups, dtype=np.int32),
        "target_index": np.array([s["target index"] for s in setups], np.int32),
        "target_class": np.array([s["target class"] for s in setups], np.int32),
        "base_class": np.array([s["base class"] for s in setups], np.int32),
        "base_indices": np.array([s["base indices"] for s in setups], np.int32),
    }


def victim_rows(
    train_labels: np.ndarray, base_class: int, bases: np.ndarray, per_class: int
) -> np.ndarray:
    """The benchmark's PoisonedDataset rows: first `per_class` per class without the
    bases; the base class keeps its first `per_class - len(bases)` plus the bases."""
    rows = []
    for c in range(int(train_labels.max()) + 1):
        idx = np.setdiff1d(np.flatnonzero(train_labels == c), bases)
        keep = per_class - len(bases) if c == base_class else per_class
        rows.append(idx[:keep])
    return np.sort(np.concatenate([*rows, bases]))


def pool_and_subsets(train_labels, specs, per_class):
    """A shared pool of training rows and each setup's subset as pool positions."""
    subsets = [
        victim_rows(train_labels, b, bases, per_class)
        for b, bases in zip(specs["base_class"], specs["base_indices"], strict=True)
    ]
    pool = np.unique(np.concatenate(subsets))
    position = {int(r): i for i, r in enumerate(pool)}
    as_pool = np.vectorize(position.__getitem__, otypes=[np.int32])
    return pool, np.stack([as_pool(s) for s in subsets]), as_pool


def clean_pool_rows(subsets, base_pool_rows, pool_size: int) -> np.ndarray:
    """Pool positions that some setup trains on unpoisoned (sorted)."""
    used = np.zeros(pool_size, bool)
    for subset, bases in zip(subsets, base_pool_rows, strict=True):
        used[np.setdiff1d(subset, bases)] = True
    return np.flatnonzero(used)


def scatter_rows(values, rows: np.ndarray, n: int):
    """An (n, ...) array holding `values` at `rows` and zeros elsewhere (rows that
    are only ever replaced by poisons: their clean features are never used)."""
    return jnp.zeros((n, *values.shape[1:]), values.dtype).at[rows].set(values)


def setup_trials(
    model,
    craft_cfg,
    victim_cfg,
    pool_data,
    variables,
    test_features,
    test_labels,
    train_images,
    target_images,
    base_pool_rows,
    base_indices,
    base_class,
    subset,
    seed,
):
    """One chunk of setups: craft every poison, train every victim, evaluate.

    Arrays with a leading setup axis: target_images (S, H, W, C), base_pool_rows and
    base_indices (S, B), base_class (S,), subset (S, M), seed (S,).
    """
    s, b = base_indices.shape
    bases = train_images[base_indices].astype(jnp.float32) / 255.0
    targets = jnp.repeat(target_images[:, None], b, axis=1)
    # One setup's 25 bases per crafting batch, setups in sequence inside the program:
    # on CPU, batches of 25 ran 1.3x faster per poison than one batch of 250
    # (benchmarks/crafting.py), the activations staying in cache.
    poisons, state = jax.lax.map(
        lambda bt: fc.craft(model, variables, bt[0], bt[1], craft_cfg), (bases, targets)
    )
    poisons, bases = (
        poisons.reshape(s * b, *poisons.shape[2:]),
        bases.reshape(s * b, *bases.shape[2:]),
    )
    state = jax.tree.map(lambda x: x.reshape(s * b, *x.shape[2:]), state)
    # The benchmark saves poisons as 8-bit images (ToPILImage truncates x * 255) and
    # its victims train on those; truncation keeps them inside the 8/255 ball.
    poisons = jnp.floor(poisons * 255.0) / 255.0
    data = pool_data._replace(
        poison_images=poisons.reshape(s, b, *poisons.shape[1:]),
        poison_indices=base_pool_rows,
        poison_labels=jnp.broadcast_to(base_class[:, None], base_pool_rows.shape),
        subset=subset,
    )
    keys = jax.vmap(jax.random.key)(seed)
    trained, metrics = train_vmapped(model, variables, data, keys, victim_cfg)
    heads = head_variables(trained)
    target_feats = fc.target_features(model, variables, target_images)
    target_logits = jax.vmap(lambda h, f: model.apply_head(h, f[None])[0])(
        heads, target_feats
    )
    test_pred = jax.vmap(lambda h: jnp.argmax(model.apply_head(h, test_features), -1))(
        heads
    )
    perturbation = jnp.abs(poisons - bases).reshape(s, -1).max(axis=1)
    return {
        "prediction": jnp.argmax(target_logits, -1),
        "base_class_prob": jax.nn.softmax(target_logits)[jnp.arange(s), base_class],
        "clean_accuracy": jnp.mean(test_pred == test_labels[None], axis=1),
        "max_perturbation": perturbation,
        "feature_distance": state.distance.reshape(s, b).mean(axis=1),
        "craft_iterations": state.iteration.reshape(s, b).mean(axis=1),
        "train_accuracy": metrics["accuracy"][:, -1],
        "poisons": jnp.round(poisons * 255.0)
        .astype(jnp.uint8)
        .reshape(s, b, *poisons.shape[1:]),
    }


def export_poisons(poison_dir: str, workdir: str, test_images: np.ndarray) -> None:
    """All chunks' poisons as one `poisons.npz`, and each setup in the benchmark's
    own format under `benchmark_format/setup_NNN/` (for its poison_test.py)."""
    parts = [
        load_poisons_npz(os.path.join(poison_dir, f))
        for f in sorted(os.listdir(poison_dir))
        if f.endswith(".npz")
    ]
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    save_poisons_npz(os.path.join(workdir, "poisons.npz"), **merged)
    for i, setup in enumerate(merged["setup"]):
        save_benchmark_format(
            os.path.join(workdir, "benchmark_format", f"setup_{int(setup):03d}"),
            merged["poisons"][i],
            int(merged["base_class"][i]),
            merged["base_indices"][i],
            test_images[merged["target_indices"][i]],
            int(merged["target_class"][i]),
        )


def plot_results(rows: list[dict], path: str) -> None:
    """The table as a figure: success with its 95% Wilson interval next to the
    published white-box FC rate; the poisons' feature distance to their target;
    the victims' base-class probability for the target (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = rate_summary(r["success"] for r in rows)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    axes[0].bar(["this run", "published (white-box FC)"], [100 * s["rate"], 22.0])
    axes[0].errorbar(
        [0],
        [100 * s["rate"]],
        yerr=[
            [100 * (s["rate"] - s["ci95_low"])],
            [100 * (s["ci95_high"] - s["rate"])],
        ],
        color="k",
        capsize=4,
    )
    axes[0].set(ylabel="success (%)", title=f"{s['successes']}/{s['n']} setups")
    ok = np.array([r["success"] for r in rows])
    dist = np.array([r["feature_distance"] for r in rows])
    prob = np.array([r["base_class_prob"] for r in rows])
    axes[1].hist(
        [dist[~ok], dist[ok]], bins=20, stacked=True, label=["fail", "success"]
    )
    axes[1].set(xlabel="mean ||f(poison) - f(target)||", ylabel="setups")
    axes[1].legend(fontsize=8)
    bins = np.logspace(np.log10(max(prob.min(), 1e-6)), 0, 20)
    axes[2].hist(
        [prob[~ok], prob[ok]], bins=bins, stacked=True, label=["fail", "success"]
    )
    axes[2].set(xscale="log", xlabel="victim's base-class probability of the target")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    craft_cfg = fc.FCConfig(**config.craft)
    victim_cfg = TrainConfig.from_mapping(config.victim)
    specs = load_setups(config.setups, config.num_setups)
    model, variables = load_pretrained(
        config.model, config.weights or shipped_weights()
    )
    train = load_cifar10("train", config.data_dir or None)
    test = load_cifar10("test", config.data_dir or None)

    pool, subsets, as_pool = pool_and_subsets(train.labels, specs, config.per_class)
    print(
        f"{len(specs['setup'])} setups; victims train on {subsets.shape[1]} images "
        f"each, drawn from a shared pool of {len(pool)}; caching their frozen "
        "features" + (" for every crop/flip" if victim_cfg.augment else "")
    )
    mesh = trial_mesh()
    specs["base_pool_rows"] = as_pool(specs["base_indices"])
    pool_data = make_train_data(train.images[pool], train.labels[pool])
    # Only rows some victim trains on clean need features: a setup's base rows are
    # always its poisons, and most bases are clean in no other setup (half the pool).
    clean = clean_pool_rows(subsets, specs["base_pool_rows"], len(pool))
    pool_data = pool_data._replace(
        features=scatter_rows(
            cache_features(
                model,
                variables,
                make_train_data(train.images[pool[clean]], train.labels[pool[clean]]),
                victim_cfg,
                mesh=mesh,
            ).features,
            clean,
            len(pool),
        )
    )
    test_features = cache_features(
        model, variables, make_train_data(test.images, test.labels), mesh=mesh
    ).features

    specs["subset"] = subsets
    specs["seed"] = specs["setup"] + np.int32(config.seed)
    # Each device crafts and trains its own setups (a while loop per setup cannot be
    # split by XLA's sharding propagation; see sweep.sharding.per_device).
    chunk_fn = jax.jit(
        per_device(
            functools.partial(setup_trials, model, craft_cfg, victim_cfg),
            mesh,
            trial_args=(False,) * 5 + (True,) * 6,
        )
    )
    shared = (
        pool_data,
        variables,
        test_features,
        jnp.asarray(test.labels),
        jnp.asarray(train.images),
    )

    poison_dir = os.path.join(workdir, "poisons")

    shared = replicate(shared, mesh)

    def trial_rows(sharded):
        chunk = to_host(sharded)  # host copies for the rows and the targets
        targets = np.asarray(test.images[chunk["target_index"]], np.float32) / 255.0
        out = to_host(
            chunk_fn(
                *shared,
                shard_trials(targets, mesh),
                *(
                    sharded[k]
                    for k in (
                        "base_pool_rows",
                        "base_indices",
                        "base_class",
                        "subset",
                        "seed",
                    )
                ),
            )
        )
        # Poisons first, rows second: a chunk with rows always has its poisons.
        save_poisons_npz(
            os.path.join(poison_dir, f"setups_{int(chunk['setup'][0]):05d}.npz"),
            poisons=out["poisons"],
            setup=chunk["setup"],
            base_indices=chunk["base_indices"],
            target_indices=chunk["target_index"],
            base_class=chunk["base_class"],
            target_class=chunk["target_class"],
        )
        return [
            {
                "setup": int(chunk["setup"][i]),
                "target_index": int(chunk["target_index"][i]),
                "target_class": int(chunk["target_class"][i]),
                "base_class": int(chunk["base_class"][i]),
                "prediction": int(out["prediction"][i]),
                "success": bool(out["prediction"][i] == chunk["base_class"][i]),
                **{
                    k: float(out[k][i])
                    for k in (
                        "base_class_prob",
                        "clean_accuracy",
                        "max_perturbation",
                        "feature_distance",
                        "craft_iterations",
                        "train_accuracy",
                    )
                },
            }
            for i in range(len(chunk["setup"]))
        ]

    rows = run_chunks(
        trial_rows, specs, config.chunk_size, workdir, desc="setups", mesh=mesh
    )
    export_poisons(poison_dir, workdir, test.images)
    summary = {
        "experiment": "frogs_benchmark",
        "extractor": f"{config.model} pretrained on CIFAR-10",
        "success": rate_summary(r["success"] for r in rows),
        "mean_clean_accuracy": float(np.mean([r["clean_accuracy"] for r in rows])),
        "max_perturbation": float(np.max([r["max_perturbation"] for r in rows])),
        "published_fc_whitebox_success": 0.22,
    }
    write_json(os.path.join(workdir, "summary.json"), summary)
    plot_results(rows, os.path.join(workdir, "results.png"))
    s = summary["success"]
    print(
        f"feature collision, {s['n']} setups: success {100 * s['rate']:.1f}% "
        f"[{100 * s['ci95_low']:.1f}, {100 * s['ci95_high']:.1f}] (published "
        f"white-box FC: 22%), clean accuracy "
        f"{100 * summary['mean_clean_accuracy']:.2f}%"
    )
    return summary
