"""Narrow convolutions on XLA:CPU: as they are, or reshaped onto YNNPACK.

XLA:CPU runs a convolution with YNNPACK only when it has more than 16 input or
output channels. `jaxpoison.models.conv.ynn_conv` reshapes narrower ones: an odd
input count >= 3 gets a zero input channel, then at stride 1 a conv computes
`YNN_GROUP_CHANNELS // out` adjacent output columns per position as channels
(`column_grouped_conv`); the
`--widen` rows instead add zero output channels up to `YNN_MIN_CHANNELS` (17), the
form strided convs take. This times a 3x3, stride-1, 32x32 convolution per (input,
output) channel pair as it is and reshaped, forward and forward + input gradient
(what feature-collision crafting needs), medians of `--repeats` calls after a
warm-up, in one process. Run it under `taskset -c 0`: the crafter runs one device
per core.

Usage: python benchmarks/narrow_conv.py [--batch 13] [--pairs 16x16 3x16 ...] [--widen]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxpoison.models import conv  # noqa: E402

PADDING = ((1, 1), (1, 1))
# ResNet-20's stem (3x16) and first stage (16x16), and other shapes.
PAIRS = ("3x16", "16x16", "16x8", "8x16", "4x16", "5x16", "12x4")


def median_ms(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def compiled(w, x, widen: bool):
    """Forward and input gradient compiled for `x`, traced with or without widening
    (it takes effect at tracing, so they are lowered inside the context)."""

    def fwd(x):
        return conv.canonical_conv(x, w, (1, 1), PADDING)

    def grad(x):
        return jax.grad(lambda x: (fwd(x) ** 2).sum())(x)

    with contextlib.nullcontext() if widen else conv.narrow_convolutions():
        return tuple(jax.jit(f).lower(x).compile() for f in (fwd, grad))


def form(cin: int, cout: int) -> str:
    """How `ynn_conv` computes the forward conv of this benchmark."""
    if not conv.routed_to_ynn(cin, cout):
        return "as is"
    group = conv.column_group(cout, 32)
    pad = "+1 in, " if cin > 1 and cin % 2 else ""
    return pad + (f"{group} cols" if group > 1 else f"{conv.YNN_MIN_CHANNELS} outs")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=13)
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--widen", action="store_true", help="zero outputs to 17, not column groups"
    )
    args = parser.parse_args()
    if args.widen:  # column groups of one: every routed conv is widened instead
        conv.YNN_GROUP_CHANNELS = 1
    rng = np.random.default_rng(0)
    print(
        f"batch {args.batch}, 3x3 stride 1, 32x32; ms (median of {args.repeats}); "
        "speed-up = as is / reshaped"
    )
    head = (
        f"{'in x out':>8} {'reshaped as':>14} {'fwd as is':>10} {'reshaped':>8} "
        f"{'speed-up':>8} {'f+g as is':>10} {'reshaped':>8} {'speed-up':>8} "
        f"{'max|dy|':>8}"
    )
    print(head + "\n" + "-" * len(head))
    for pair in args.pairs:
        cin, cout = (int(c) for c in pair.split("x"))
        x = jnp.asarray(rng.uniform(size=(args.batch, 32, 32, cin)), jnp.float32)
        w = jnp.asarray(
            rng.normal(size=(3, 3, cin, cout)) / np.sqrt(9 * cin), jnp.float32
        )
        times, outs = {}, {}
        for widen in (False, True):
            fwd, grad = compiled(w, x, widen)
            outs[widen] = fwd(x)
            times[widen] = (
                median_ms(lambda f=fwd: f(x), args.repeats),
                median_ms(lambda g=grad: g(x), args.repeats),
            )
        (fn, gn), (fw, gw) = times[False], times[True]
        dy = float(jnp.abs(outs[False] - outs[True]).max())
        print(
            f"{pair:>8} {form(cin, cout):>14} {fn:>10.3f} {fw:>8.3f} {fn / fw:>7.2f}x "
            f"{gn:>10.3f} {gw:>8.3f} {gn / gw:>7.2f}x {dy:>8.1e}"
        )


if __name__ == "__main__":
    main()
