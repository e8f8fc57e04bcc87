"""Backdoor-grid runs per hour: N equal-shape runs as one program vs one by one.

A run is one cell of configs/backdoor_grid.py: a ResNet-20 fine-tuned end to end
on a poisoned training set (black-square poisons at rate lambda, their own seed,
alpha and poison rows; -1-padded to one shape) with early stopping on a poisoned
validation set (`victims.early_stopping`). Timed side by side in one process,
after a warm-up call that compiles, medians over `--repeats`:

* one by one: N calls of the jitted `train_early_stopping` (the peers' way: one
  training per process or per call; compilation excluded);
* one program, `lax.map`: `early_stopping_trials(trials="map")`;
* one program, `vmap`: `early_stopping_trials(trials="vmap")`.

Runs per hour = N / median seconds * 3600; the ratio is one-by-one time over
one-program time (> 1: the single program is faster). Patience is set to the
epoch count so no run stops early and every variant does the same work.

Usage:
  python benchmarks/backdoor_runs.py                 # 8 runs, 300 images, 3 epochs
  python benchmarks/backdoor_runs.py --runs 16 --epochs 2 --repeats 3
  python benchmarks/backdoor_runs.py --tiny          # a check that it works
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxpoison.attacks import backdoor, triggers  # noqa: E402
from jaxpoison.data import first_k_per_class, load_cifar10_sample  # noqa: E402
from jaxpoison.models import load_pretrained, shipped_weights  # noqa: E402
from jaxpoison.victims import TrainConfig, make_train_data  # noqa: E402
from jaxpoison.victims.early_stopping import (  # noqa: E402
    early_stopping_trials,
    train_early_stopping,
)


def _timed(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def poisoned_sets(images, labels, runs: int, poison_class: int = 0):
    """Per-run poisons (rates and alphas vary, shapes do not), as TrainData fields."""
    fn = triggers.make_trigger("black_square")
    plans, poisons = [], []
    for r in range(runs):
        rate = (0.1, 0.2, 0.4)[r % 3]
        alpha = (1.0, 0.5)[r % 2]
        plan = backdoor.poison_rate_plan(labels, poison_class, rate, r)
        key = jax.random.key(r)
        poisons.append(
            backdoor.apply_trigger_to_rows(images, plan.source_rows, fn, alpha, key)
        )
        plans.append(plan)
    stacked = backdoor.stack_plans(plans)
    size = stacked.poison_indices.shape[1]
    padded = np.zeros((runs, size, *images.shape[1:]), np.float32)
    for r, p in enumerate(poisons):
        padded[r, : len(p)] = np.asarray(p)
    return (
        jnp.asarray(padded),
        jnp.asarray(stacked.poison_indices),
        jnp.asarray(stacked.poison_labels),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--examples", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--variants", nargs="+", default=["map", "vmap"], choices=["map", "vmap"]
    )
    parser.add_argument(
        "--tiny", action="store_true", help="2 runs, 50 images, 1 epoch, 1 repeat"
    )
    args = parser.parse_args()
    if args.tiny:
        args.runs, args.examples, args.epochs, args.repeats = 2, 50, 1, 1
        args.batch = 16

    model, variables = load_pretrained("resnet20", shipped_weights("resnet20"))
    train_set, test_set = load_cifar10_sample("train"), load_cifar10_sample("test")
    per_class = max(1, min(args.examples, len(train_set.labels)) // 10)
    rows = first_k_per_class(train_set.labels, per_class)  # balanced classes
    images, labels = train_set.images[rows], train_set.labels[rows]
    n = len(rows)
    m = max(n // 4, 10)
    val_images, val_labels = test_set.images[:m], test_set.labels[:m]
    p_img, p_idx, p_lab = poisoned_sets(images, labels, args.runs)
    v_img, v_idx, v_lab = poisoned_sets(val_images, val_labels, args.runs)
    data = make_train_data(images, labels, p_img, p_idx, p_lab)
    val = make_train_data(val_images, val_labels, v_img, v_idx, v_lab)
    keys = jax.random.split(jax.random.key(0), args.runs)
    config = TrainConfig(
        mode="end_to_end",
        optimizer="sgd",
        learning_rate=0.01,
        momentum=0.9,
        weight_decay=5e-4,
        epochs=args.epochs,
        batch_size=args.batch,
    )
    patience = args.epochs  # nobody stops early: equal work in every variant

    def one_by_one():
        out = []
        for r in range(args.runs):
            d = data._replace(
                poison_images=p_img[r], poison_indices=p_idx[r], poison_labels=p_lab[r]
            )
            v = val._replace(
                poison_images=v_img[r], poison_indices=v_idx[r], poison_labels=v_lab[r]
            )
            out.append(
                train_early_stopping(model, variables, d, v, keys[r], config, patience)
            )
        return out

    print(
        f"jax {jax.__version__} on {jax.devices()}; ResNet-20 end to end, {n} "
        f"training + {m} validation images, batch {args.batch}, {args.epochs} "
        f"epoch(s), {args.runs} runs, {p_idx.shape[1]} poison slots; median of "
        f"{args.repeats}"
    )
    base = _timed(one_by_one, args.repeats)
    print(f"{'variant':<22}{'seconds':>10}{'runs/hour':>12}{'ratio':>8}")
    print(f"{'one by one':<22}{base:>10.2f}{3600 * args.runs / base:>12.0f}{1:>8.2f}")
    for how in args.variants:
        seconds = _timed(
            lambda: early_stopping_trials(
                model, variables, data, val, keys, config, patience, trials=how
            ),
            args.repeats,
        )
        print(
            f"{'one program, ' + how:<22}{seconds:>10.2f}"
            f"{3600 * args.runs / seconds:>12.0f}{base / seconds:>8.2f}"
        )


if __name__ == "__main__":
    main()
