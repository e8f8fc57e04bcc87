"""The attacks of the defence grid, and the grid's driver (shared by `defences` and
`evaluate_poisons`).

An attack is a `config.attacks` entry whose `kind` names a builder in `KINDS`;
the builder turns the entry into a `defences.grid.Poisoning` (victim, clean data,
per-trial poisons, how success is scored). Kinds:

* "transfer": a crafter of `CRAFTERS` on the poisoning benchmark's CIFAR-10
  transfer setups (Schwarzschild et al. 2021; protocol of frogs_benchmark): the
  poisons of each setup are crafted against the frozen extractor in a resumable
  sweep (`<workdir>/<attack>/craft`), stored as 8-bit images, and the victim is a
  fresh linear head trained on the first `per_class` images per class, the
  setup's bases replaced by its poisons. Success: the target is classified as the
  base class. `CRAFTERS`: feature collision (attacks/feature_collision.py),
  convex and bullseye polytope (attacks/polytope.py, white-box: the victim's
  frozen extractor crafts). Adding a transfer attack is one `CRAFTERS` entry,
  `name: Crafter(ConfigClass, craft)` with `craft(model, variables, bases
  (B, H, W, C), target (H, W, C), config) -> poisons`, plus a config entry with
  `kind="transfer", crafter=name`.
* "backdoor": a trigger of attacks/triggers.py (BadNets' patch: the black
  square at alpha 1; a blended trigger at alpha < 1) stamped on source-class
  images that supplant rows of the poison class (Truong et al. 2020, Eq. 7-9,
  `attacks.backdoor.poison_rate_plan`), one plan and victim per seed; the victim
  is trained end to end. Success: the attack success rate on the triggered test
  images of the other classes.
* "gradient_matching": Witches' Brew (Geiping et al. 2021) on the benchmark's
  from-scratch setups, crafted by experiments/gradient_matching.py's resumable
  crafting (`<workdir>/<attack>/craft`: a surrogate trained from scratch per
  setup, then the poisons; a config entry is configs/gradient_matching.py's
  config) and stored as 8-bit images; the victim is the same network trained
  from scratch on the setup's training rows (the surrogate's), the poisons in
  the bases' rows with their clean labels. Success: the target is classified
  as the base class.
* "benchmark_poisons": poisons from elsewhere in the poisoning benchmark's format
  (`poisons_dir`: one folder per setup with poisons.pickle, base_indices.pickle,
  target.pickle, as the benchmark's craft scripts or forest's `--save benchmark`
  write them), evaluated on the transfer victim above (`protocol="transfer"`) or
  on a victim trained end to end (`protocol="from_scratch"`).

`run_grid` runs every attack's `Poisoning` against every defence
(`defences.grid.defence_trials`), one resumable sweep per attack
(`<workdir>/<attack>/`), and writes results.jsonl, summary.json (a table of
attack x defence), tables.md and success_vs_accuracy.png.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxpoison.attacks import backdoor, polytope, triggers
from jaxpoison.attacks import feature_collision as fc
from jaxpoison.attacks.interop import (
    load_benchmark_format,
    merge_poisons_npz,
    save_poisons_npz,
)
from jaxpoison.checks import require
from jaxpoison.data import load_dataset
from jaxpoison.data.benchmark import load_setups, victim_rows
from jaxpoison.data.splits import random_subset
from jaxpoison.defences import grid
from jaxpoison.errors import UserInputError
from jaxpoison.experiments import gradient_matching as gm
from jaxpoison.experiments.common import pretrained_model, row_pool
from jaxpoison.models import initial_model
from jaxpoison.plots import label, panels, save_figure
from jaxpoison.report import markdown_table
from jaxpoison.results import atomic_write_text, write_json, write_jsonl
from jaxpoison.summaries import group_summary
from jaxpoison.sweep import Trial, named_key, run_trials, trial_seeds
from jaxpoison.sweep.sharding import trial_mesh
from jaxpoison.victims import TrainConfig, cache_features, make_train_data


class Context(NamedTuple):
    """What every attack builder reads besides its own config entry."""

    data_dir: str | None
    workdir: str
    seed: int


class Crafter(NamedTuple):
    """A transfer attack's crafter: its config class and `craft(model, variables,
    bases, target, config) -> poisons` for one setup (pure, jittable)."""

    config: type
    craft: Callable


def _craft_feature_collision(model, variables, bases, target, config):
    targets = jnp.repeat(target[None], bases.shape[0], axis=0)
    return fc.craft(model, variables, bases, targets, config)[0]


def _craft_polytope(model, variables, bases, target, config):
    # White-box, as the benchmark's craft_poisons_{cp,bp}.py: one member, the
    # victim's frozen extractor (benchmark_transfer's `crafter` without ensemble).
    def features(x):
        return model.apply(variables, x, train=False)[1]

    return polytope.craft([features], bases, target, config)[0]


CRAFTERS: dict[str, Crafter] = {
    "feature_collision": Crafter(fc.FCConfig, _craft_feature_collision),
    "convex_polytope": Crafter(
        functools.partial(polytope.PolytopeConfig, method="cp"), _craft_polytope
    ),
    "bullseye_polytope": Crafter(
        functools.partial(polytope.PolytopeConfig, method="bp"), _craft_polytope
    ),
}


# --------------------------------------------------------------------------
# transfer: crafted on the benchmark's setups, linear victims


def craft_setups(name, cfg, ctx: Context, model, variables, train, test, setups):
    """Each setup's poisons (S, B, H, W, C) uint8, crafted in a resumable sweep
    (`<workdir>/<name>/craft`; each chunk's poisons saved with it)."""
    crafter = CRAFTERS.get(cfg.crafter)
    if crafter is None:
        raise UserInputError(
            f"attack {name}: unknown crafter {cfg.crafter!r}; known: "
            f"{', '.join(CRAFTERS)}"
        )
    craft_cfg = crafter.config(**cfg.craft)
    workdir = os.path.join(ctx.workdir, name, "craft")
    specs = {
        "setup": setups["setup"],
        "base_indices": setups["base_indices"],
        "target_image": test.images[setups["target_index"]].astype(np.float32) / 255,
    }

    def run(shared, spec):
        bases = shared[spec["base_indices"]].astype(jnp.float32) / 255.0
        poisons = jax.lax.map(
            lambda bt: crafter.craft(model, variables, bt[0], bt[1], craft_cfg),
            (bases, spec["target_image"]),
        )
        # The benchmark stores poisons as 8-bit images (ToPILImage truncates x*255).
        return {
            "poisons": jnp.floor(poisons * 255.0).astype(jnp.uint8),
            "linf": jnp.abs(jnp.floor(poisons * 255.0) / 255.0 - bases).max(
                axis=(1, 2, 3, 4)
            ),
        }

    def save(index, spec, out, wd):
        del index
        save_poisons_npz(
            os.path.join(wd, "poisons", f"setups_{int(spec['setup'][0]):05d}.npz"),
            poisons=out["poisons"],
            setup=spec["setup"],
        )

    def row(spec, out):
        return {"setup": int(spec["setup"]), "max_perturbation": float(out["linf"])}

    run_trials(
        Trial(run, row, save),
        jnp.asarray(train.images),
        specs,
        chunk_size=int(cfg.chunk_size),
        workdir=workdir,
        mesh=trial_mesh(),
        desc=f"{name}: crafting",
    )
    merged = merge_poisons_npz(os.path.join(workdir, "poisons"))
    order = np.argsort(merged["setup"])
    return merged["poisons"][order]


def targeted_poisoning(**fields) -> grid.Poisoning:
    """A `grid.Poisoning` of targeted setups (transfer, gradient matching, poisons
    from elsewhere): success is the target classified as the base class, and a row
    is identified by its setup, target class and base class."""
    return grid.Poisoning(
        evaluate=grid.targeted_evaluate,
        targeted=True,
        id_fields=("setup", "target_class", "base_class"),
        **fields,
    )


def transfer_problem(name, cfg, ctx, model, variables, train, test, setups):
    """A `Poisoning` of setups (arrays: setup, target_image float, target_class,
    base_class, base_indices (S, B), poisons uint8 (S, B, ...), poison_label)
    against the benchmark's linear victim on the frozen extractor."""
    victim = TrainConfig.from_mapping(cfg.victim)
    require(victim.mode == "linear", f"attack {name}: the victim must be linear")
    subsets = [
        victim_rows(train.labels, c, b, int(cfg.per_class))
        for c, b in zip(setups["base_class"], setups["base_indices"], strict=True)
    ]
    pool = row_pool(len(train.labels), *subsets)
    data = make_train_data(train.images[pool.rows], train.labels[pool.rows])
    data = cache_features(model, variables, data, victim, mesh=trial_mesh())
    test_rows = random_subset(len(test.labels), int(cfg.test_examples), ctx.seed)
    s, b = setups["base_indices"].shape
    specs = {
        "setup": setups["setup"].astype(np.int32),
        "target_class": setups["target_class"].astype(np.int32),
        "base_class": setups["base_class"].astype(np.int32),
        "poison_images": setups["poisons"].astype(np.float32) / 255.0,
        "poison_indices": pool.at(setups["base_indices"]).astype(np.int32),
        "poison_labels": np.broadcast_to(
            setups["poison_label"][:, None], (s, b)
        ).astype(np.int32),
        "subset": pool.at(np.stack(subsets)).astype(np.int32),
        # frogs_benchmark's victim seeds: its exported poisons, evaluated here,
        # train the very victims it trained.
        "seed": trial_seeds(ctx.seed, s),
        "target_image": setups["target_image"].astype(np.float32),
        "poison_label": setups["poison_label"].astype(np.int32),
    }
    shared = {
        "test_features": grid.frozen_test_features(
            model, variables, test.images[test_rows]
        ),
        "test_labels": jnp.asarray(test.labels[test_rows]),
    }
    return targeted_poisoning(
        attack=name,
        model=model,
        variables=variables,
        victim=victim,
        data=data,
        specs=specs,
        shared=shared,
        num_poisons=b,
        info={
            "kind": "transfer",
            "victim": f"linear head on the frozen {cfg.model}, {int(cfg.per_class)} "
            f"images per class, {victim.epochs} epochs",
            "poisons_per_setup": b,
            "test_images": len(test_rows),
        },
    )


def transfer_poisoning(name: str, cfg, ctx: Context) -> grid.Poisoning:
    """A crafter of `CRAFTERS` on the benchmark's transfer setups."""
    setups = load_setups(cfg.setups_file, int(cfg.setups))
    model, variables = pretrained_model(cfg)
    train = load_dataset("cifar10", "train", ctx.data_dir)
    test = load_dataset("cifar10", "test", ctx.data_dir)
    setups["poisons"] = craft_setups(
        name, cfg, ctx, model, variables, train, test, setups
    )
    setups["target_image"] = test.images[setups["target_index"]].astype(np.float32)
    setups["target_image"] /= 255.0
    setups["poison_label"] = setups["base_class"]
    return transfer_problem(name, cfg, ctx, model, variables, train, test, setups)


# --------------------------------------------------------------------------
# backdoor: a trigger on source images supplanting poison-class rows


def backdoor_poisoning(name: str, cfg, ctx: Context) -> grid.Poisoning:
    """BadNets / blended backdoors (Truong et al. 2020's poison-rate plan)."""
    victim = TrainConfig.from_mapping(cfg.victim)
    train = load_dataset(cfg.dataset, "train", ctx.data_dir)
    test = load_dataset(cfg.dataset, "test", ctx.data_dir)
    keep = random_subset(len(train.labels), int(cfg.examples), ctx.seed)
    held_out = np.setdiff1d(np.arange(len(train.labels)), keep)[:1]
    images, labels = train.images[keep], train.labels[keep]
    test_rows = random_subset(len(test.labels), int(cfg.test_examples), ctx.seed + 1)
    test_x, test_y = test.images[test_rows], test.labels[test_rows]
    num_classes = len(train.class_names)
    poison_class = int(cfg.poison_class)
    require(0 <= poison_class < num_classes, f"attack {name}: poison_class range")
    params = {}
    if cfg.trigger == "sine":
        params = dict(reference_width=int(cfg.sine_reference_width))
    elif cfg.trigger == "low_variance":
        pattern = triggers.low_variance_pattern(
            images, train.images[held_out[0]], seed=ctx.seed
        )
        params = dict(pattern=pattern)
    fn = triggers.make_trigger(cfg.trigger, **params)
    seeds = trial_seeds(ctx.seed, int(cfg.seeds), offset=2000)
    plans, poisons, triggered = [], [], []
    for s in seeds:
        plan = backdoor.poison_rate_plan(labels, poison_class, float(cfg.rate), int(s))
        key = named_key(name, int(s))
        plans.append(plan)
        poisons.append(
            np.asarray(
                backdoor.apply_trigger_to_rows(
                    images, plan.source_rows, fn, float(cfg.alpha), key
                )
            )
        )
        triggered.append(
            np.asarray(
                backdoor.apply_trigger_to_rows(
                    test_x,
                    np.arange(len(test_y)),
                    fn,
                    float(cfg.alpha),
                    named_key(name, int(s), "test"),
                )
            )
        )
    stacked = backdoor.stack_plans(plans)
    p = stacked.poison_indices.shape[1]
    require(p > 0, f"attack {name}: rate {cfg.rate} gives no poisons")
    padded = np.zeros((len(seeds), p, *images.shape[1:]), np.float32)
    for i, x in enumerate(poisons):
        padded[i, : len(x)] = x
    model, variables = initial_model(
        cfg.model, num_classes, jax.random.key(ctx.seed), cfg.init
    )
    specs = {
        "seed": seeds,
        "poison_images": padded,
        "poison_indices": stacked.poison_indices,
        "poison_labels": stacked.poison_labels,
        "poison_label": np.full(len(seeds), poison_class, np.int32),
        "triggered": np.stack(triggered).astype(np.float32),
        "eligible": np.broadcast_to(test_y != poison_class, (len(seeds), len(test_y))),
        "n_poisons": (stacked.poison_indices >= 0).sum(1).astype(np.int32),
    }
    shared = {"test_images": jnp.asarray(test_x), "test_labels": jnp.asarray(test_y)}
    return grid.Poisoning(
        attack=name,
        model=model,
        variables=variables,
        victim=victim,
        data=make_train_data(images, labels),
        specs=specs,
        shared=shared,
        evaluate=grid.backdoor_evaluate,
        targeted=False,
        num_poisons=p,
        id_fields=("seed", "n_poisons"),
        info={
            "kind": "backdoor",
            "trigger": f"{cfg.trigger} at alpha {float(cfg.alpha)}",
            "victim": f"{cfg.model} ({cfg.init}) end to end, {len(keep)} training "
            f"images, {victim.epochs} epochs",
            "poisons": p,
            "test_images": len(test_y),
        },
    )


# --------------------------------------------------------------------------
# gradient_matching: Witches' Brew on the from-scratch setups


def gradient_matching_poisoning(name: str, cfg, ctx: Context) -> grid.Poisoning:
    """Gradient matching crafted by experiments/gradient_matching.py (its
    surrogates and resumable per-setup crafting), victims trained from scratch."""
    craft_cfg, victim, surrogate_cfg = gm.check_config(cfg)
    setup = gm.load_setup(cfg, ctx.data_dir)
    model, variables = initial_model(  # the setups are CIFAR-10's: 10 classes
        cfg.model, 10, jax.random.key(ctx.seed + gm.VICTIM_SEED_OFFSET), "scratch"
    )
    crafted = gm.craft_all(
        model,
        cfg,
        craft_cfg,
        surrogate_cfg,
        setup,
        os.path.join(ctx.workdir, name, "craft"),
        trial_mesh(),
    )
    specs, labels = setup["specs"], setup["labels"]
    s, b = specs["base_rows"].shape
    trials = {
        "setup": specs["setup"].astype(np.int32),
        "target_class": specs["target_class"].astype(np.int32),
        "base_class": specs["base_class"].astype(np.int32),
        "poison_images": gm.poisons_uint8(crafted).astype(np.float32) / 255.0,
        "poison_indices": specs["base_rows"].astype(np.int32),
        "poison_labels": labels[specs["base_rows"]],  # clean labels
        "subset": specs["subset"].astype(np.int32),
        "seed": trial_seeds(ctx.seed, s, offset=gm.VICTIM_SEED_OFFSET),
        "target_image": specs["target_image"].astype(np.float32),
        "poison_label": specs["base_class"].astype(np.int32),
    }
    shared = {
        "test_images": jnp.asarray(setup["test_images"]),
        "test_labels": jnp.asarray(setup["test_labels"]),
    }
    return targeted_poisoning(
        attack=name,
        model=model,
        variables=variables,
        victim=victim,
        data=make_train_data(setup["images"], labels),
        specs=trials,
        shared=shared,
        num_poisons=b,
        info={
            "kind": "gradient_matching (from scratch)",
            "victim": f"{cfg.model} from scratch on {specs['subset'].shape[1]} "
            f"images, {victim.epochs} epochs",
            "poisons_per_setup": b,
            "craft": f"{craft_cfg.steps} steps, {craft_cfg.restarts} restarts, eps "
            f"{255 * craft_cfg.epsilon:.3g}/255",
            "test_images": len(setup["test_labels"]),
        },
    )


# --------------------------------------------------------------------------
# benchmark_poisons: poisons from elsewhere, in the benchmark's format


def benchmark_folders(directory: str) -> list[str]:
    """The setup folders under `directory` (sorted), or `directory` itself when
    it is one (holds poisons.pickle)."""
    if not os.path.isdir(directory):
        raise UserInputError(f"poisons_dir not found: {directory}")
    if os.path.isfile(os.path.join(directory, "poisons.pickle")):
        return [directory]
    found = sorted(
        os.path.join(directory, d)
        for d in os.listdir(directory)
        if os.path.isfile(os.path.join(directory, d, "poisons.pickle"))
    )
    if not found:
        raise UserInputError(
            f"no poisons in the benchmark's format under {directory} (folders "
            "with poisons.pickle, base_indices.pickle, target.pickle)"
        )
    return found


def read_benchmark_poisons(directory: str, limit: int = 0) -> dict[str, np.ndarray]:
    """Every setup folder of `directory` as arrays (one row per setup): poisons
    uint8 (S, B, ...), base_indices, poison_label (the first poison's label, as the
    benchmark's poison_test.py), target_image float (patched for a triggered
    backdoor), target_class, setup."""
    folders = benchmark_folders(directory)[: limit or None]
    loaded = [load_benchmark_format(f) for f in folders]
    sizes = {len(x["poisons"]) for x in loaded}
    if len(sizes) != 1:
        raise UserInputError(
            f"setups under {directory} have different numbers of poisons {sizes}"
        )
    return {
        "setup": np.arange(len(loaded), dtype=np.int32),
        "folder": np.array([os.path.basename(f) for f in folders]),
        "poisons": np.stack([x["poisons"] for x in loaded]),
        "base_indices": np.stack([x["base_indices"] for x in loaded]).astype(np.int64),
        "poison_label": np.array([x["poison_labels"][0] for x in loaded], np.int32),
        "base_class": np.array([x["poison_labels"][0] for x in loaded], np.int32),
        "target_image": np.stack([x["target_image"] for x in loaded]).astype(np.float32)
        / 255.0,
        "target_class": np.array([x["target_label"] for x in loaded], np.int32),
    }


def from_scratch_problem(name, cfg, ctx, train, test, setups) -> grid.Poisoning:
    """Setups' poisons against a victim trained end to end (the benchmark's
    from-scratch protocol trains on the whole training set; `examples` keeps a
    seeded subset that always holds the bases)."""
    victim = TrainConfig.from_mapping(cfg.victim)
    bases = np.unique(setups["base_indices"])
    others = np.setdiff1d(np.arange(len(train.labels)), bases)
    if int(cfg.examples):  # a seeded subset of the others fills up to `examples`
        keep = max(int(cfg.examples) - len(bases), 1)
        others = others[random_subset(len(others), keep, ctx.seed)]
    rows = np.sort(np.concatenate([bases, others]))
    position = np.full(len(train.labels), -1, np.int64)
    position[rows] = np.arange(len(rows))
    test_rows = random_subset(len(test.labels), int(cfg.test_examples), ctx.seed)
    model, variables = initial_model(
        cfg.model, len(train.class_names), jax.random.key(ctx.seed), cfg.init
    )
    s, b = setups["base_indices"].shape
    specs = {
        "setup": setups["setup"],
        "target_class": setups["target_class"],
        "base_class": setups["base_class"],
        "poison_images": setups["poisons"].astype(np.float32) / 255.0,
        "poison_indices": position[setups["base_indices"]].astype(np.int32),
        "poison_labels": np.broadcast_to(
            setups["poison_label"][:, None], (s, b)
        ).astype(np.int32),
        "seed": trial_seeds(ctx.seed, s, offset=1000),
        "target_image": setups["target_image"],
        "poison_label": setups["poison_label"],
    }
    shared = {
        "test_images": jnp.asarray(test.images[test_rows]),
        "test_labels": jnp.asarray(test.labels[test_rows]),
    }
    return targeted_poisoning(
        attack=name,
        model=model,
        variables=variables,
        victim=victim,
        data=make_train_data(train.images[rows], train.labels[rows]),
        specs=specs,
        shared=shared,
        num_poisons=b,
        info={
            "kind": "benchmark_poisons (from scratch)",
            "victim": f"{cfg.model} ({cfg.init}) end to end on {len(rows)} images, "
            f"{victim.epochs} epochs",
            "poisons_per_setup": b,
        },
    )


def benchmark_poisoning(name: str, cfg, ctx: Context) -> grid.Poisoning:
    """Poisons read from `cfg.poisons_dir` (the benchmark's format)."""
    if not cfg.poisons_dir:
        raise UserInputError(
            "poisons_dir is empty: name a folder of poisons in the poisoning "
            "benchmark's format (--config.poisons_dir=DIR or poisons_dir=DIR)"
        )
    setups = read_benchmark_poisons(os.path.expanduser(cfg.poisons_dir), cfg.setups)
    train = load_dataset("cifar10", "train", ctx.data_dir)
    test = load_dataset("cifar10", "test", ctx.data_dir)
    n = len(train.labels)
    bad = setups["base_indices"][
        (setups["base_indices"] < 0) | (setups["base_indices"] >= n)
    ]
    if bad.size:
        raise UserInputError(
            f"base index {int(bad[0])} is outside the CIFAR-10 training set"
        )
    if cfg.protocol == "from_scratch":
        return from_scratch_problem(name, cfg, ctx, train, test, setups)
    if cfg.protocol != "transfer":
        raise UserInputError(
            f"protocol must be 'transfer' or 'from_scratch', not {cfg.protocol!r}"
        )
    model, variables = pretrained_model(cfg)
    return transfer_problem(name, cfg, ctx, model, variables, train, test, setups)


KINDS: dict[str, Callable[[str, Any, Context], grid.Poisoning]] = {
    "transfer": transfer_poisoning,
    "backdoor": backdoor_poisoning,
    "gradient_matching": gradient_matching_poisoning,
    "benchmark_poisons": benchmark_poisoning,
}


def build_poisoning(name: str, cfg, ctx: Context) -> grid.Poisoning:
    kind = cfg.get("kind")
    if kind not in KINDS:
        raise UserInputError(
            f"attack {name}: unknown kind {kind!r}; known: {', '.join(KINDS)}"
        )
    return KINDS[kind](name, cfg, ctx)


# --------------------------------------------------------------------------
# the grid


def summarise(rows: list[dict], targeted: dict[str, bool]) -> dict:
    """Per attack and defence: success (a rate with its Wilson interval for a
    targeted attack, the mean ASR for a backdoor), mean clean accuracy and its
    drop from the undefended victim's (`clean_accuracy_cost`) and, for filters,
    mean poison recall and clean rows removed."""
    table: dict[str, dict] = {}
    for attack, is_targeted in targeted.items():
        sel = [r for r in rows if r["attack"] == attack]
        means = ["clean_accuracy", "poison_recall", "clean_removed_fraction"]
        if not is_targeted:
            means.append("attack_success_rate")
        got = group_summary(
            sel, ("defence",), rate="success" if is_targeted else None, means=means
        )
        cells = {k.split("=", 1)[1]: v for k, v in got.items()}
        if "none" in cells:  # what each defence costs in clean accuracy
            base = cells["none"]["mean_clean_accuracy"]
            for c in cells.values():
                c["clean_accuracy_cost"] = base - c["mean_clean_accuracy"]
        table[attack] = cells
    return table


def success_of(entry: dict) -> float:
    return entry["rate"] if "rate" in entry else entry["mean_attack_success_rate"]


def markdown(table: dict, defences) -> str:
    """Attack x defence: success % (clean accuracy %), and what filters removed."""
    body = []
    for attack, cells in table.items():
        row = [attack]
        for d in defences:
            c = cells.get(d)
            if c is None:
                row.append("")
                continue
            accuracy = f"({100 * c['mean_clean_accuracy']:.1f}%)"
            text = f"{100 * success_of(c):.0f}% {accuracy}"
            if "rate" in c:
                low, high = 100 * c["ci95_low"], 100 * c["ci95_high"]
                text = f"{100 * c['rate']:.0f}% [{low:.0f}, {high:.0f}] {accuracy}"
            if not np.isnan(c.get("mean_poison_recall", np.nan)):
                text += (
                    f"; recall {100 * c['mean_poison_recall']:.0f}%, clean removed "
                    f"{100 * c['mean_clean_removed_fraction']:.1f}%"
                )
            row.append(text)
        body.append(row)
    head = markdown_table(["attack", *defences], body)
    return (
        "Success (targeted: % of setups with the 95% Wilson interval; backdoors: "
        "mean attack success rate) and, in parentheses, mean clean test accuracy; "
        "for filters, poison recall and clean training rows removed.\n\n" + head
    )


def plot(table: dict, defences, path: str) -> None:
    """Success vs clean accuracy, a panel per attack, a point per defence."""
    fig, axes = panels(len(table), size=(4.4, 3.6))
    for ax, (attack, cells) in zip(axes, table.items(), strict=True):
        for i, d in enumerate(defences):
            c = cells.get(d)
            if c is None:
                continue
            x, y = 100 * c["mean_clean_accuracy"], 100 * success_of(c)
            err = None
            if "rate" in c:
                err = [[y - 100 * c["ci95_low"]], [100 * c["ci95_high"] - y]]
            ax.errorbar(x, y, yerr=err, fmt="o", color=f"C{i % 10}", label=d)
        label(ax, attack, "clean test accuracy (%)", "attack success (%)")
    save_figure(fig, path)


def run_grid(config, attacks: dict[str, Any], workdir: str, experiment: str) -> dict:
    """Every attack of `attacks` x every defence of `config.defences`."""
    defences = tuple(config.defences)
    filters = {k: dict(v) for k, v in config.filters.items()}
    training = {k: dict(v) for k, v in config.training.items()}
    grid.check_defences(defences, filters, training)
    ctx = Context(config.data_dir or None, workdir, int(config.seed))
    rows, targeted, info = [], {}, {}
    for name, cfg in attacks.items():
        p = build_poisoning(name, cfg, ctx)
        used = {d: training[d] for d in defences if d in grid.TRAINING}
        configs = grid.defence_configs(p.victim, used)
        core = p._replace(data=None, specs=None, shared=None, variables=None)
        trial = Trial(
            functools.partial(grid.defence_trials, core, defences, filters, configs),
            functools.partial(grid.defence_rows, core),
        )
        shared = {"data": p.data, "variables": p.variables, "eval": p.shared}
        n = len(p.specs["seed"])
        print(f"{name}: {n} trials x {len(defences)} defences ({p.info['victim']})")
        rows += run_trials(
            trial,
            shared,
            p.specs,
            chunk_size=int(cfg.get("chunk_size", config.chunk_size)),
            workdir=os.path.join(workdir, name),
            mesh=trial_mesh(),
            desc=name,
        )
        targeted[name] = p.targeted
        info[name] = p.info
    write_jsonl(os.path.join(workdir, "results.jsonl"), rows)
    table = summarise(rows, targeted)
    summary = {
        "experiment": experiment,
        "attacks": info,
        "defences": list(defences),
        "filters": filters,
        "training_defences": {d: training[d] for d in defences if d in training},
        # `name=value` keys: `jaxpoison.report` groups the rows by attack and defence.
        "table": {
            f"attack={a}": {f"defence={d}": c for d, c in cells.items()}
            for a, cells in table.items()
        },
    }
    write_json(os.path.join(workdir, "summary.json"), summary)
    text = markdown(table, defences)
    atomic_write_text(os.path.join(workdir, "tables.md"), text + "\n")
    plot(table, defences, os.path.join(workdir, "success_vs_accuracy.png"))
    print(text)
    return summary
