"""An RGB stem convolution as XLA's convolution or as a matmul over patches.

`jaxpoison.models.conv` runs convolutions with at most `PATCH_CHANNELS` input
channels as `patch_conv` (im2col + one matmul). This times both forms of ResNet-20's
stem (3x3, 3 -> 16 channels, 32x32 images), forward and forward + input gradient (what
feature-collision crafting needs), medians of `--repeats` calls after a warm-up, in
one process; run it under `taskset -c 0` for one core.

Usage: python benchmarks/stem_conv.py [--batch 12 25 128] [--repeats 50]
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

from jaxpoison.models.conv import canonical_conv, patch_conv  # noqa: E402

PADDING = ((1, 1), (1, 1))


def median_ms(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[12, 25, 128])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 16)).astype(np.float32))
    forms = {"convolution": canonical_conv, "patches": patch_conv}
    print(f"{'batch':>5} {'form':<12} {'forward ms':>10} {'fwd+grad ms':>11}")
    for b in args.batch:
        x = jnp.asarray(rng.uniform(size=(b, 32, 32, 3)).astype(np.float32))
        outs = {}
        for name, conv in forms.items():
            fwd = jax.jit(lambda x, conv=conv: conv(x, w, (1, 1), PADDING))
            grad = jax.jit(
                jax.grad(lambda x, conv=conv: (conv(x, w, (1, 1), PADDING) ** 2).sum())
            )
            outs[name] = fwd(x)
            f, g = (
                median_ms(lambda: fwd(x), args.repeats),
                median_ms(lambda: grad(x), args.repeats),
            )
            print(f"{b:>5} {name:<12} {f:>10.3f} {g:>11.3f}")
        diff = float(jnp.abs(outs["convolution"] - outs["patches"]).max())
        print(f"      max |difference| of the outputs: {diff:.1e}")


if __name__ == "__main__":
    main()
