"""Victim-training throughput: one run, 8 runs one after another, 8 runs vmapped.

Everything is timed in one process, side by side, after a warm-up call that
compiles; each number is the median over `--repeats`. Images per second count
training examples processed (epochs x examples x runs). The ratios that matter are
for the same 8 runs: time one after another (separate jitted trainings) over time as
one program, either vmapped (trials batched into every step) or `lax.map`ped (trials
in sequence inside one program); > 1 means the one program is faster.

Usage:
  python benchmarks/victim_training.py                    # ~3 min on 2 CPU cores
  python benchmarks/victim_training.py --loops scan step --runs 8 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxpoison.data import load_cifar10_sample  # noqa: E402
from jaxpoison.models import load_pretrained, shipped_weights  # noqa: E402
from jaxpoison.victims import (  # noqa: E402
    TrainConfig,
    make_train_data,
    train,
    train_vmapped,
)


def _timed(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loops", nargs="+", default=["step", "scan"])
    parser.add_argument("--modes", nargs="+", default=["end_to_end", "linear_aug"])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model, variables = load_pretrained("resnet20", shipped_weights("resnet20"))
    sample = load_cifar10_sample("train")
    data = make_train_data(sample.images, sample.labels)
    n = len(sample.labels)
    keys = jax.random.split(jax.random.key(0), args.runs)
    print(
        f"jax {jax.__version__} on {jax.devices()}; ResNet-20, {n} CIFAR-10 images,"
        f" batch {args.batch}, {args.epochs} epoch(s), median of {args.repeats}"
    )
    print(
        f"{'mode':<12}{'loop':<7}{'one run':>12}{'8 in a row':>12}"
        f"{'8 vmapped':>12}{'row/vmap':>10}{'8 lax.map':>12}{'row/map':>10}"
        "   (images/s; ratios are time over time)"
    )
    for mode in args.modes:
        for loop in args.loops:
            config = TrainConfig(
                mode="linear" if mode == "linear_aug" else "end_to_end",
                cold_start_head=mode == "linear_aug",
                optimizer="sgd",
                learning_rate=0.01,
                momentum=0.9,
                weight_decay=5e-4,
                epochs=args.epochs,
                batch_size=args.batch,
                augment=True,
                loop=loop,
            )
            one = _timed(
                lambda: train(model, variables, data, keys[0], config), args.repeats
            )
            row = _timed(
                lambda: [train(model, variables, data, k, config) for k in keys],
                args.repeats,
            )
            vm = _timed(
                lambda: train_vmapped(
                    model, variables, data, keys, config, trials="vmap"
                ),
                args.repeats,
            )
            mp = _timed(
                lambda: train_vmapped(
                    model, variables, data, keys, config, trials="map"
                ),
                args.repeats,
            )
            images = n * args.epochs
            print(
                f"{mode:<12}{loop:<7}{images / one:>12.0f}"
                f"{images * args.runs / row:>12.0f}"
                f"{images * args.runs / vm:>12.0f}{row / vm:>10.2f}"
                f"{images * args.runs / mp:>12.0f}{row / mp:>10.2f}"
            )


if __name__ == "__main__":
    main()
