"""One victim's training under each loop driver (`TrainConfig.loop`), side by side.

`victims.train` on the CPU runs a victim one of three ways (`victims/loops.py`):
"step" (a host loop of jitted steps), "epoch" (a host loop of jitted epochs, each a
`lax.scan` over its steps) or "scan" (the whole run as one program); "auto" picks
by backend (`loops.PREFERRED`). This times the three on the same training: the
shipped pretrained ResNet-20 fine-tuned end to end (SGD 0.01, momentum 0.9, weight
decay 5e-4, batch 128, random crop + flip) on `--images` random CIFAR-sized images
for `--epochs` epochs. The drivers alternate over `--repeats` rounds, each timed
after a compiling warm-up; images/s are medians, and each driver's ratio is to
"step". Compilation is excluded.

The process has one CPU device per core (`split_cpu_into_devices`, as the CLI); the
three drivers run on the first (`split_batch=False`), and "epoch-split" is the
default "epoch" driver with each batch split over all of them
(victims/data_parallel.py).

Usage:
  python benchmarks/train_loops.py                 # ~4 min on 2 CPU cores
  python benchmarks/train_loops.py --repeats 5 --loops step epoch epoch-split
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxpoison.distributed import split_cpu_into_devices  # noqa: E402
from jaxpoison.models import load_pretrained, shipped_weights  # noqa: E402
from jaxpoison.victims import TrainConfig, make_train_data, train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--loops", nargs="+", default=["step", "epoch", "scan", "epoch-split"]
    )
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    split_cpu_into_devices()  # before JAX's backends start

    model, variables = load_pretrained("resnet20", shipped_weights("resnet20"))
    rng = np.random.default_rng(0)
    data = make_train_data(
        rng.integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 10, args.images),
    )
    configs = {
        loop: TrainConfig(
            mode="end_to_end",
            optimizer="sgd",
            learning_rate=0.01,
            momentum=0.9,
            weight_decay=5e-4,
            epochs=args.epochs,
            batch_size=128,
            augment=True,
            loop=loop.removesuffix("-split"),
            split_batch=loop.endswith("-split"),
        )
        for loop in args.loops
    }
    key = jax.random.key(0)
    for config in configs.values():  # compile every driver first
        jax.block_until_ready(train(model, variables, data, key, config))
    rates = {loop: [] for loop in configs}
    for _ in range(args.repeats):
        for loop, config in configs.items():
            start = time.perf_counter()
            jax.block_until_ready(train(model, variables, data, key, config))
            rates[loop].append(
                args.images * args.epochs / (time.perf_counter() - start)
            )
    base = statistics.median(rates[args.loops[0]])
    print(
        f"jax {jax.__version__}, {jax.default_backend()}; ResNet-20 end to end, "
        f"{args.images} images x {args.epochs} epochs, batch 128; medians of "
        f"{args.repeats}; loop='auto' runs {_auto()!r} here; "
        f"{jax.device_count()} devices"
    )
    print(f"{'loop':<12}{'images/s':>10}{'vs ' + args.loops[0]:>10}   repeats")
    for loop, r in rates.items():
        rate = statistics.median(r)
        print(f"{loop:<12}{rate:>10.0f}{rate / base:>10.2f}   {[round(x) for x in r]}")


def _auto() -> str:
    from jaxpoison.victims import loops

    return loops.PREFERRED.get(jax.default_backend(), "scan")


if __name__ == "__main__":
    main()
