"""Which XLA:CPU kernels a convolution block's gradient compiles to, under XLA_FLAGS.

Compiles (never runs) `jax.grad` of a 3x3 convolution, a BatchNorm-style
normalisation over the batch and a ReLU (batch 128, 16x16, 32 channels, ResNet-20's
second stage), and prints the kinds of fusion and custom call in the compiled HLO:
`__ynn_fusion` (YNNPACK), `__xnn_fusion` (XNNPACK's graph fusion), oneDNN custom
calls, XLA's own `convolution`. It answers whether a flag moves the convolutions
onto another library, without timing anything.

Usage:
  python benchmarks/cpu_fusions.py
  XLA_FLAGS='--xla_cpu_use_xnnpack=true
    --xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY'
    python benchmarks/cpu_fusions.py
"""

from __future__ import annotations

import argparse
import collections
import os
import re

import jax
import jax.numpy as jnp
from jax import lax

KINDS = re.compile(r"__\w+_fusion|__onednn\$\w+|\bconvolution\(")


def block_loss(x, w):
    y = lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    mean = y.mean((0, 1, 2))
    var = ((y - mean) ** 2).mean((0, 1, 2))
    return jax.nn.relu((y - mean) * lax.rsqrt(var + 1e-5)).sum()


def main() -> None:
    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()
    grad = jax.jit(jax.grad(block_loss, (0, 1)))
    x, w = jnp.ones((128, 16, 16, 32)), jnp.ones((3, 3, 32, 32))
    hlo = grad.lower(x, w).compile().as_text()
    counts = collections.Counter(KINDS.findall(hlo))
    print(f"jax {jax.__version__}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    for kind, n in sorted(counts.items()):
        print(f"  {kind:<24} {n}")


if __name__ == "__main__":
    main()
