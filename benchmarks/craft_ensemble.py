"""MetaPoison's craft step with its surrogates in a host loop or dealt over devices.

`attacks.metapoison` runs the M surrogates' metagradients and clean epochs either
one after another from the host (`ensemble="loop"`, one jitted call each) or as one
program per phase whose surrogates are dealt over the local devices
(`ensemble="devices"`, `over_devices`). This times both on the same crafting
problem: the shipped pretrained ResNet-20 as every surrogate (fine-tuning, lr 0.01,
as the default's fine-tuned crafting run), the shipped CIFAR-10 sample's 300
training images, 4 dog bases, one target, K = 2, `--batch` images per step, M =
`--surrogates`. Each variant runs in its own Python with one CPU device per core
(as the CLI), in alternating order over `--repeats` rounds; a round reports the
seconds to the end of the first craft step (compilation included: `init`, whose
staggered warm-up epochs run here too, and one step) and the median of `--steps`
further craft steps.

Usage:
  python benchmarks/craft_ensemble.py                  # ~3 min on 2 CPU cores
  python benchmarks/craft_ensemble.py --batch 20 --surrogates 3 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("loop", "devices")


def worker(args) -> None:
    """One variant's timings, printed as a JSON line."""
    from jaxpoison.distributed import split_cpu_into_devices

    split_cpu_into_devices()  # before JAX's backends start
    import jax
    import numpy as np

    from jaxpoison.attacks import metapoison as mp
    from jaxpoison.data import load_cifar10_sample
    from jaxpoison.models import load_pretrained, shipped_weights

    model, variables = load_pretrained("resnet20", shipped_weights("resnet20"))
    sample = load_cifar10_sample("train")
    images, labels = sample.images, sample.labels
    rows = np.flatnonzero(labels == 5)[:4]
    problem = mp.CraftProblem(
        images=images,
        labels=labels,
        clean_rows=np.setdiff1d(np.arange(len(labels)), rows),
        bases=images[rows].astype(np.float32) / 255,
        base_labels=labels[rows],
        targets=images[:1].astype(np.float32) / 255,
        adv_labels=np.array([5], np.int32),
    )
    config = mp.MetaPoisonConfig(
        surrogates=args.surrogates,
        stagger=1,
        surrogate_init="pretrained",
        learning_rate=0.01,
        warmup_epochs=0,
        batch_size=args.batch,
        ensemble=args.worker,
    )
    start = time.perf_counter()
    state = mp.init(model, variables, problem, config, jax.random.key(0))
    step = mp.make_step(model, variables, config)
    state, _ = step(state, problem)
    jax.block_until_ready(state)
    first = time.perf_counter() - start
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, _ = step(state, problem)
        jax.block_until_ready(state)
        seconds.append(time.perf_counter() - start)
    print(json.dumps({"variant": args.worker, "first": first, "steps": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--surrogates", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    results = {v: [] for v in VARIANTS}
    for r in range(args.repeats):
        for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            command = [sys.executable, __file__, "--worker", variant]
            for flag in ("batch", "surrogates", "steps"):
                command += [f"--{flag}", str(getattr(args, flag))]
            out = subprocess.run(command, capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            results[variant].append(row)
            print(
                f"round {r + 1} {variant}: first step {row['first']:.1f} s, "
                f"steps {[round(s, 2) for s in row['steps']]}",
                flush=True,
            )
    print(f"batch {args.batch}, M = {args.surrogates}; medians over rounds")
    header = ("ensemble", "to first step s", "craft step s", "speed-up")
    print(f"{header[0]:<10}{header[1]:>18}{header[2]:>15}{header[3]:>10}")
    step_of = {
        v: statistics.median(statistics.median(r["steps"]) for r in rows)
        for v, rows in results.items()
    }
    for variant, rows in results.items():
        first = statistics.median(r["first"] for r in rows)
        speed = step_of["loop"] / step_of[variant]
        print(f"{variant:<10}{first:>18.1f}{step_of[variant]:>15.2f}{speed:>9.2f}x")


if __name__ == "__main__":
    main()
