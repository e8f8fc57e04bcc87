"""Memory of victims trained in traced trials over several CPU devices, per weight-
gradient form: does the process's RSS grow while one program runs?

Each device of a 2-device CPU runs `victims.train` (ResNet-20 from scratch, plain
SGD, batch 125, on 1,000 random images with 10 poisons) on its own trials, as
`sweep.run_trials` runs every end-to-end sweep (a `per_device` `shard_map`, a
`lax.map` over the device's trials). A sampler thread reads the RSS every second;
the script prints the growth over the second half of the run (after the program's
buffers are allocated), in MB per second. The forms are those of
`benchmarks/weight_grad.py`, patched into `models/conv.py`'s block loop:
  ours           (O, pixels) x (pixels, KH KW C), the library's
  channel_major  (KH KW C, pixels) x (pixels, O): the default on 2026-12-01/02; its
                 growth took a MetaPoison run to 15.8 GB
  pixel_major    im2col's (pixels, KH KW C) patches contracted on their pixel axis
Each form runs in its own process, with 2 CPU devices set through XLA_FLAGS
(`--form` runs one in this process, on the devices the environment gives).

Usage:
  python benchmarks/traced_victim_memory.py                # all three, ~6 min
  python benchmarks/traced_victim_memory.py --epochs 4 --forms ours
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

FORMS = ("ours", "channel_major", "pixel_major")
BATCH, IMAGES, POISONS, DEVICES = 125, 1000, 10, 2


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**30


def measure(form: str, epochs: int, trials: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from weight_grad import patch  # this folder, the script's path

    from jaxpoison.models import load_pretrained, shipped_weights
    from jaxpoison.sweep.sharding import per_device, trial_mesh
    from jaxpoison.victims import TrainConfig, make_train_data, train

    patch(form)
    model, _ = load_pretrained("resnet20", shipped_weights("resnet20"))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.random((IMAGES, 32, 32, 3), np.float32))
    labels = jnp.asarray(rng.integers(0, 10, IMAGES).astype(np.int32))
    rows = jnp.arange(POISONS)
    poisons = jnp.asarray(rng.random((trials, POISONS, 32, 32, 3), np.float32))
    config = TrainConfig(
        learning_rate=0.1, momentum=0.0, batch_size=BATCH, epochs=epochs
    )

    def trial(p, key):
        data = make_train_data(images, labels, p, rows, labels[rows])
        trained, _ = train(model, model.init(key), data, key, config)
        return jax.tree.map(jnp.sum, trained)

    def run(p, keys):
        return jax.lax.map(lambda a: trial(*a), (p, keys))

    fn = jax.jit(per_device(run, trial_mesh(), (True, True)))
    keys = jax.random.split(jax.random.key(0), trials)
    compiled = fn.lower(poisons, keys).compile()
    samples, done = [], threading.Event()

    def sample():
        while not done.is_set():
            samples.append((time.perf_counter(), rss_gb()))
            time.sleep(1.0)

    threading.Thread(target=sample, daemon=True).start()
    time.sleep(1.5)  # the first sample: after compilation, before the run
    start = time.perf_counter()
    jax.block_until_ready(compiled(poisons, keys))
    seconds = time.perf_counter() - start
    done.set()
    print(json.dumps([round(r, 3) for _, r in samples]), file=sys.stderr)
    # The window: the run's second half, after its buffers are allocated.
    (t0, r0), (t1, r1) = samples[len(samples) // 2], samples[-1]
    return {
        "form": form,
        "run_s": round(seconds, 1),
        "rss_half_gb": round(r0, 2),
        "rss_end_gb": round(r1, 2),
        "mb_per_s": round((r1 - r0) * 1024 / (t1 - t0), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS))
    parser.add_argument("--form", choices=FORMS, help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--trials", type=int, default=2 * DEVICES)
    args = parser.parse_args()
    if args.form:
        return print(json.dumps(measure(args.form, args.epochs, args.trials)))
    print(
        f"{DEVICES} CPU devices, {args.trials} trials of {args.epochs} epochs "
        f"(batch {BATCH}, {IMAGES} images); RSS growth during the run"
    )
    print(f"{'form':<16}{'run s':>8}{'RSS half-way':>14}{'RSS end':>10}{'MB/s':>8}")
    for form in args.forms:
        command = [sys.executable, __file__, "--form", form]
        command += ["--epochs", str(args.epochs), "--trials", str(args.trials)]
        # The device count through XLA_FLAGS: the channel-major form's growth shows
        # there in this script; with `jax_num_cpu_devices` (the CLI's) it showed in
        # a whole MetaPoison run but not here.
        flags = f"--xla_force_host_platform_device_count={DEVICES}"
        env = {**os.environ, "XLA_FLAGS": flags}
        out = subprocess.run(
            command, capture_output=True, text=True, check=True, env=env
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{form:<16}{r['run_s']:>8}{r['rss_half_gb']:>14}{r['rss_end_gb']:>10}"
            f"{r['mb_per_s']:>8}"
        )


if __name__ == "__main__":
    main()
