"""Trials with inner loops over devices: one device, SPMD auto-partitioning, per_device.

A chunk of feature-collision setups (25 bases each) is crafted setup after setup with
`lax.map` (each setup a while loop), as frogs_benchmark does, three ways in one
process with one JAX CPU device per core:

  one device      jit on device 0,
  auto-partitioned  the same jit with the setup axis sharded over the mesh (XLA's
                  sharding propagation decides what each device does),
  per_device      `sweep.sharding.per_device`: a shard_map, each device crafting its
                  own setups.

Random images, the fixed step rule (every setup does the same work), medians of
`--repeats` after a warm-up; max|dx| against the one-device poisons.

Usage: python benchmarks/per_device.py [--setups 10] [--iterations 30] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxpoison.attacks import feature_collision as fc  # noqa: E402
from jaxpoison.distributed import split_cpu_into_devices  # noqa: E402
from jaxpoison.models import load_pretrained, shipped_weights  # noqa: E402
from jaxpoison.sweep.sharding import TRIALS, per_device, trial_mesh  # noqa: E402

BASES = 25


def median_s(fn, repeats):
    out = jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times), np.asarray(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setups", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpu-devices", type=int, default=0)
    args = parser.parse_args()
    split_cpu_into_devices(args.cpu_devices)
    mesh = trial_mesh()
    if args.setups % mesh.size:
        raise SystemExit(f"--setups must be a multiple of {mesh.size} devices")
    model, variables = load_pretrained("resnet20", shipped_weights())
    cfg = fc.FCConfig(step_rule="fixed", iterations=args.iterations)

    def setups(b, t):
        return jax.lax.map(
            lambda bt: fc.craft(model, variables, bt[0], bt[1], cfg)[0], (b, t)
        )

    rng = np.random.default_rng(0)
    shape = (args.setups, BASES, 32, 32, 3)
    b, t = (rng.uniform(size=shape).astype(np.float32) for _ in range(2))
    sharded = jax.device_put((b, t), NamedSharding(mesh, P(TRIALS)))
    plain = jax.jit(setups)
    mapped = jax.jit(per_device(setups, mesh, (True, True)))
    variants = {
        "one device": lambda: plain(b, t),
        "auto-partitioned": lambda: plain(*sharded),
        "per_device": lambda: mapped(*sharded),
    }
    print(
        f"{args.setups} setups x {BASES} bases, {args.iterations} iterations, "
        f"{mesh.size} CPU devices, median of {args.repeats}"
    )
    ref = None
    for name, fn in variants.items():
        seconds, out = median_s(fn, args.repeats)
        ref = out if ref is None else ref
        rate = args.setups * BASES * args.iterations / seconds
        print(
            f"{name:<17} {seconds:6.2f} s  {rate:6.0f} poison-it/s  "
            f"max|dx| {np.abs(out - ref).max():.1e}"
        )


if __name__ == "__main__":
    main()
