"""Sweep scaling: throughput vs trials per chunk and vs devices; memory vs trials.

The trial is the quickstart's (jaxpoison/experiments/quickstart.py): a dirty-label
poisoned transfer-learning victim, the last layer of the shipped ResNet-20 retrained
from a cold start on cached frozen features, evaluated on the sample's test set.
Trials run through the real sweep engine (`run_chunks`: JSONL rows and an orbax
checkpoint per chunk), the trial axis sharded over a `trial_mesh()`.

Every point is a fresh Python process (fake CPU devices must be set before JAX
starts, and peak RSS only grows within a process), started with
`XLA_FLAGS=--xla_force_host_platform_device_count=D`. Per point:

- compile_s: the first chunk (compile + run), timed apart;
- trials_per_s: all `--trials` trials through `run_chunks` after that (jit cache
  hit; checkpoint and JSONL writes included);
- XLA's memory analysis of the compiled chunk program (`compiled.memory_analysis()`:
  argument, output and temporary bytes; per device when sharded);
- peak_rss_mb: the process's peak resident memory (`resource.getrusage`).

Fake devices share the host's cores: on a CPU they measure the sharding machinery's
overhead, not a speed-up; on a TPU VM or a GPU box, `--devices` takes real ones.

Usage:
  python benchmarks/scaling.py                  # the full table (not run here)
  python benchmarks/scaling.py --tiny           # seconds: checks that it works
  python benchmarks/scaling.py --chunks 16 64 --devices 1 8 --trials 256 --out s.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure(devices: int, chunk: int, trials: int, epochs: int) -> dict:
    """One point, in this process (started with `devices` fake devices)."""
    import jax
    import jax.numpy as jnp
    import ml_collections

    from jaxpoison.data import load_cifar10_sample
    from jaxpoison.experiments import quickstart
    from jaxpoison.models import load_pretrained, shipped_weights
    from jaxpoison.sweep import run_chunks
    from jaxpoison.sweep.sharding import (
        pad_to_multiple,
        shard_trials,
        to_host,
        trial_mesh,
    )
    from jaxpoison.victims import TrainConfig, cache_features, make_train_data

    assert jax.device_count() == devices, (jax.device_count(), devices)
    counts = (0, 1, 4, 16)
    config = ml_collections.ConfigDict(
        dict(seed=0, num_targets=-(-trials // len(counts)), poison_counts=counts)
    )
    victim = TrainConfig(
        mode="linear",
        cold_start_head=True,
        optimizer="adam",
        learning_rate=0.01,
        epochs=epochs,
        batch_size=64,
    )
    model, variables = load_pretrained("resnet20", shipped_weights("resnet20"))
    train, test = load_cifar10_sample("train"), load_cifar10_sample("test")
    specs = quickstart.make_specs(config, train.labels, test.labels, 10)
    specs = {k: v[:trials] for k, v in specs.items()}
    clean = cache_features(
        model, variables, make_train_data(train.images, train.labels)
    )
    test_features = cache_features(
        model, variables, make_train_data(test.images, test.labels)
    ).features
    test_images = jnp.asarray(test.images, jnp.float32) / 255.0
    shared = (clean, variables, test_features, test_images, jnp.asarray(test.labels))
    chunk_fn = jax.jit(functools.partial(quickstart.poisoned_victims, model, victim))
    names = ("target", "base_class", "poison_rows", "seed")
    mesh = trial_mesh()

    def call(chunk):
        return chunk_fn(*shared, *(chunk[k] for k in names))

    def trial_rows(chunk):
        out = to_host(call(chunk))
        return [{"success": bool(s)} for s in out["target_prediction"]]

    first, _ = pad_to_multiple({k: v[:chunk] for k, v in specs.items()}, devices)
    first = shard_trials(first, mesh)
    start = time.perf_counter()
    jax.block_until_ready(call(first))
    compile_s = time.perf_counter() - start
    compiled = chunk_fn.lower(*shared, *(first[k] for k in names)).compile()
    memory = compiled.memory_analysis()
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        rows = run_chunks(trial_rows, specs, chunk, workdir, desc="bench", mesh=mesh)
        run_s = time.perf_counter() - start
    assert len(rows) == trials
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "devices": devices,
        "chunk": chunk,
        "trials": trials,
        "epochs": epochs,
        "compile_s": round(compile_s, 3),
        "run_s": round(run_s, 3),
        "trials_per_s": round(trials / run_s, 2),
        "argument_mb": round(memory.argument_size_in_bytes / 2**20, 2),
        "output_mb": round(memory.output_size_in_bytes / 2**20, 3),
        "temp_mb": round(memory.temp_size_in_bytes / 2**20, 2),
        "peak_rss_mb": round(rss / 1024, 1),
    }


def run_point(devices: int, chunk: int, trials: int, epochs: int) -> dict:
    """`measure` in a fresh Python with `devices` fake CPU devices."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}"
    env.setdefault("JAX_PLATFORMS", "cpu")
    args = ["--worker", str(devices), str(chunk), str(trials), str(epochs)]
    proc = subprocess.run(
        [sys.executable, __file__, *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"point {args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


COLUMNS = (
    "devices",
    "chunk",
    "trials",
    "compile_s",
    "trials_per_s",
    "argument_mb",
    "temp_mb",
    "peak_rss_mb",
)


def table(points: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for p in points:
        lines.append("| " + " | ".join(str(p[c]) for c in COLUMNS) + " |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        devices, chunk, trials, epochs = map(int, sys.argv[2:6])
        print(json.dumps(measure(devices, chunk, trials, epochs)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--device_chunk", type=int, default=64)
    parser.add_argument("--trials", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--tiny", action="store_true", help="smallest sizes")
    parser.add_argument("--out", default="", help="write the points as JSON here")
    args = parser.parse_args()
    if args.tiny:
        args.chunks, args.devices, args.device_chunk = [4, 8], [1, 2], 4
        args.trials, args.epochs = 8, 1
    points = []
    print("throughput and memory vs trials per chunk (1 device):", flush=True)
    for chunk in args.chunks:
        points.append(run_point(1, chunk, max(args.trials, chunk), args.epochs))
        print(points[-1], flush=True)
    print(f"throughput vs devices (chunk {args.device_chunk}):", flush=True)
    for devices in args.devices:
        points.append(run_point(devices, args.device_chunk, args.trials, args.epochs))
        print(points[-1], flush=True)
    print(table(points))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(points, f, indent=2)


if __name__ == "__main__":
    main()
