"""Why ResNet steps run slower inside `lax.scan` than as host-looped jit calls (CPU).

Times, in one process, the same ResNet-20 step driven five ways:

  host          a jitted step called from a Python loop (the baseline),
  scan          `lax.scan` over all steps inside one jit,
  scan-unrollK  the same with `unroll=K`,
  chunksK       a Python loop over jitted K-step scans,
  chunksK-full  the same with each K-step scan fully unrolled (no while loop),
  *+canon       the step traced with `canonical_convs()` (see below),

and, each in a subprocess because XLA reads its flags once at import, host and scan
under XLA flags that are commonly suggested for slow CPU loops. It does this for a
Poison Frogs crafting step (gradient w.r.t. the inputs, eval-mode BatchNorm) and for
an SGD training step (cross-entropy, train-mode BatchNorm, gradient w.r.t. weights).

The cause it demonstrates: reverse-mode autodiff of a convolution emits
convolutions whose dimension numbers are not the canonical NHWC/HWIO/NHWC (the
input gradient uses the kernel as `01oi`, the weight gradient puts the batch in the
feature slot). XLA:CPU's `ConvCanonicalization` pass rewrites such convolutions
into transposes plus a canonical convolution, but only in the entry computation. In
a while-loop body (scan, fori_loop) they stay non-canonical, so neither the Eigen
convolution thunk nor the YNNPACK fusion can take them and XLA falls back to its
naive elemental convolution loop. The `naive` column counts those convolutions in
the optimised HLO. `canonical_convs()` gives convolutions a custom VJP that writes
both gradients as canonical convolutions with explicit transposes, which makes the
loop body as fast as the entry computation.

Usage:
  python benchmarks/scan_vs_host.py                  # everything, about 2-3 min
  python benchmarks/scan_vs_host.py --steps 8 --batch 32 --repeats 3 --no-flags
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import jaxlib
from jax import lax

DEFAULT_WEIGHTS = "/work/shared/data/weights/resnet20_cifar10.npz"
FLAG_VARIANTS = {
    "legacy-runtime": "--xla_cpu_use_thunk_runtime=false",
    "fast-math": "--xla_cpu_enable_fast_math=true",
    "eigen-1-thread": "--xla_cpu_multi_thread_eigen=false",
    "onednn": "--xla_cpu_use_onednn=true",
    "no-small-while": (
        "--xla_backend_extra_options=xla_cpu_small_while_loop_byte_threshold=0"
    ),
}
CANONICAL = ("NHWC", "HWIO", "NHWC")
_CONV = lax.conv_general_dilated  # the unpatched primitive wrapper


# --- canonical convolution gradients ------------------------------------------------


def _conv(x, w, strides, padding):
    return _CONV(x, w, strides, padding, dimension_numbers=CANONICAL)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def canonical_conv(x, w, strides, padding):
    """NHWC/HWIO 2-D convolution whose gradients are canonical convolutions too."""
    return _conv(x, w, strides, padding)


def _canonical_conv_fwd(x, w, strides, padding):
    return _conv(x, w, strides, padding), (x, w)


def _canonical_conv_bwd(strides, padding, res, g):
    x, w = res
    # Input gradient: JAX transposes a conv whose kernel is labelled "HWOI" into
    # one labelled "HWIO", so store the kernel as HWOI with an explicit transpose.
    w_oi = jnp.transpose(w, (0, 1, 3, 2))
    _, vjp = jax.vjp(
        lambda a: _CONV(
            a, w_oi, strides, padding, dimension_numbers=("NHWC", "HWOI", "NHWC")
        ),
        x,
    )
    (dx,) = vjp(g)
    # Weight gradient as a canonical conv: batch <- input channels, features <-
    # images, kernel <- the output gradient with the stride as kernel dilation.
    pads = []
    for d, (lo, _) in enumerate(padding):
        n_in, n_out, k, s = x.shape[1 + d], g.shape[1 + d], w.shape[d], strides[d]
        pads.append((lo, k + (n_out - 1) * s - n_in - lo))
    dw = _CONV(
        jnp.transpose(x, (3, 1, 2, 0)),
        jnp.transpose(g, (1, 2, 0, 3)),
        (1, 1),
        pads,
        rhs_dilation=strides,
        dimension_numbers=CANONICAL,
    )
    return dx, jnp.transpose(dw, (1, 2, 0, 3))


canonical_conv.defvjp(_canonical_conv_fwd, _canonical_conv_bwd)


def _patched_conv(
    lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
    dimension_numbers=None, feature_group_count=1, batch_group_count=1,
    precision=None, preferred_element_type=None,
):
    simple = (
        lhs.ndim == 4
        and feature_group_count == 1
        and batch_group_count == 1
        and not isinstance(padding, str)
        and all(d == 1 for d in (lhs_dilation or (1, 1)))
        and all(d == 1 for d in (rhs_dilation or (1, 1)))
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        == lax.conv_dimension_numbers(lhs.shape, rhs.shape, CANONICAL)
    )
    if not simple:
        return _CONV(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
            dimension_numbers, feature_group_count, batch_group_count, precision,
            preferred_element_type,
        )
    return canonical_conv(
        lhs, rhs, tuple(window_strides), tuple(tuple(p) for p in padding)
    )


@contextlib.contextmanager
def canonical_convs():
    """While tracing, route `lax.conv_general_dilated` (as Flax calls it) through
    `canonical_conv` for plain NHWC/HWIO convolutions."""
    with mock.patch.object(lax, "conv_general_dilated", _patched_conv):
        yield


# --- the two steps ------------------------------------------------------------------


def _load(weights: str):
    try:
        from jaxpoison.models import load_pretrained
    except ModuleNotFoundError:  # run from a checkout without installing
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from jaxpoison.models import load_pretrained
    return load_pretrained("resnet20", weights)


def craft_problem(weights: str, batch: int):
    """(step, x0): one Poison Frogs forward-backward step on `batch` poisons."""
    model, variables = _load(weights)
    base = jax.random.uniform(jax.random.key(0), (batch, 32, 32, 3))
    target = jax.random.uniform(jax.random.key(1), (1, 32, 32, 3))
    target_feat = model.apply(variables, target)[1]
    lr, beta = 0.01, 0.25

    def loss(x):
        return jnp.sum((model.apply(variables, x, train=False)[1] - target_feat) ** 2)

    def step(x):
        x = jnp.clip(x - lr * jax.grad(loss)(x), 0.0, 1.0)
        return (x + lr * beta * base) / (1 + lr * beta)

    return step, base


def train_problem(weights: str, batch: int):
    """(step, state0): one SGD step with train-mode BatchNorm on a fixed batch."""
    model, variables = _load(weights)
    images = jax.random.uniform(jax.random.key(2), (batch, 32, 32, 3))
    labels = jax.random.randint(jax.random.key(3), (batch,), 0, 10)

    def loss(params, stats):
        (logits, _), new_stats = model.apply_train(
            {"params": params, "batch_stats": stats}, images
        )
        logp = jax.nn.log_softmax(logits)
        nll = -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))
        return nll, new_stats

    def step(state):
        params, stats = state
        grads, stats = jax.grad(loss, has_aux=True)(params, stats)
        params = jax.tree.map(lambda p, g: p - 0.01 * g, params, grads)
        return params, stats

    return step, (variables["params"], variables["batch_stats"])


# --- drivers ------------------------------------------------------------------------


def _scan(step, length, unroll):
    def run(x):
        return lax.scan(lambda c, _: (step(c), None), x, None, length, unroll=unroll)[0]

    return run


def make_driver(step, kind: str, steps: int, k: int = 1):
    """(jittable fn, calls per run): run `steps` steps as `calls` calls of fn."""
    if kind == "host":  # a fresh function, so that no earlier trace is reused
        return lambda x: step(x), steps
    if kind == "scan":
        return _scan(step, steps, k), 1
    if kind == "chunks":
        return _scan(step, k, 1), steps // k
    if kind == "chunks-full":
        return _scan(step, k, True), steps // k
    raise ValueError(kind)


def naive_convs(hlo: str) -> int:
    """Convolutions left non-canonical in optimised HLO (the elemental fallback)."""
    labels = re.findall(r"= \S+ convolution\(.*?dim_labels=([^,\s]+)", hlo)
    return sum(lbl != "b01f_01io->b01f" for lbl in labels)


def measure(step, x0, kind, steps, repeats, k=1, canon=False) -> dict:
    fn, calls = make_driver(step, kind, steps, k)
    t0 = time.perf_counter()
    with canonical_convs() if canon else contextlib.nullcontext():
        compiled = jax.jit(fn).lower(x0).compile()
    compile_s = time.perf_counter() - t0
    naive = naive_convs(compiled.as_text())
    jax.block_until_ready(compiled(x0))  # warm-up: first-run allocations
    times = []
    for _ in range(repeats):
        x = x0
        t = time.perf_counter()
        for _ in range(calls):
            x = compiled(x)
        jax.block_until_ready(x)
        times.append(time.perf_counter() - t)
    return {"its": steps / statistics.median(times), "compile_s": compile_s,
            "naive": naive}


def _variants(steps, unrolls, chunk):
    out = [("host", "host", 1, False), ("scan", "scan", 1, False)]
    out += [(f"scan-unroll{u}", "scan", u, False) for u in unrolls]
    out += [(f"chunks{chunk}", "chunks", chunk, False),
            (f"chunks{chunk}-full", "chunks-full", chunk, False),
            ("host+canon", "host", 1, True), ("scan+canon", "scan", 1, True)]
    chunked = ("chunks", "chunks-full")
    return [v for v in out if v[1] not in chunked or steps % v[2] == 0]


def run_section(title, problem, steps, repeats, variants, per_item):
    step, x0 = problem
    rows = []
    for name, kind, k, canon in variants:
        r = measure(step, x0, kind, steps, repeats, k, canon)
        rows.append((name, r))
        print(f"  measured {name:<16} {r['its']:8.2f} steps/s", flush=True)
    print_table(title, rows, per_item)
    return rows


def print_table(title, rows, per_item):
    base = dict(rows).get("host", rows[0][1])["its"]
    print(f"\n{title}")
    print(f"{'variant':<24}{'steps/s':>9}{per_item[0]:>12}{'vs host':>9}"
          f"{'naive':>7}{'compile s':>11}")
    for name, r in rows:
        print(f"{name:<24}{r['its']:9.2f}{r['its'] * per_item[1]:12.0f}"
              f"{r['its'] / base:9.2f}{r['naive']:7d}{r['compile_s']:11.1f}")
    print()


def flag_worker(args) -> None:
    """In a subprocess with XLA_FLAGS already set: host and scan crafting."""
    problem = craft_problem(args.weights, args.batch)
    out = {kind: measure(*problem, kind, args.steps, args.repeats)
           for kind in ("host", "scan")}
    print("RESULT " + json.dumps(out), flush=True)


def run_flag_variants(args) -> list:
    rows = []
    for name in args.flags:
        env = dict(os.environ)
        flags = env.get("XLA_FLAGS", "") + " " + FLAG_VARIANTS[name]
        env["XLA_FLAGS"] = flags.strip()
        cmd = [sys.executable, __file__, "--worker", "--steps", str(args.steps),
               "--batch", str(args.batch), "--repeats", str(args.repeats),
               "--weights", args.weights]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not found:
            err = (proc.stderr.strip().splitlines() or ["?"])[-1][:70]
            print(f"  flag {name}: failed ({err})", flush=True)
            continue
        res = json.loads(found[-1][len("RESULT "):])
        for line in proc.stderr.splitlines():
            if "no longer supported" in line or "nknown flag" in line:
                print(f"  flag {name}: XLA says: {line.split('] ')[-1][:70]}")
        for kind in ("host", "scan"):
            rows.append((f"{kind} [{name}]", res[kind]))
        print(f"  flag {name:<16} host {res['host']['its']:7.2f}  scan "
              f"{res['scan']['its']:7.2f} steps/s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8, help="crafting steps per run")
    p.add_argument("--batch", type=int, default=32, help="poisons per step")
    p.add_argument("--repeats", type=int, default=3, help="timed runs (median)")
    p.add_argument("--unrolls", type=int, nargs="*", default=[2, 4])
    p.add_argument("--chunk", type=int, default=4, help="steps per jitted chunk")
    p.add_argument("--train-steps", type=int, default=4)
    p.add_argument("--train-batch", type=int, default=128)
    p.add_argument("--no-train", action="store_true", help="skip the training step")
    p.add_argument("--flags", nargs="*", default=list(FLAG_VARIANTS),
                   choices=list(FLAG_VARIANTS), help="XLA flag variants to run")
    p.add_argument("--no-flags", action="store_true", help="skip XLA flag variants")
    p.add_argument("--weights", default=DEFAULT_WEIGHTS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        flag_worker(args)
        return

    print(f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, "
          f"python {platform.python_version()}, {os.cpu_count()} CPUs")
    print(f"devices: {jax.devices()}")
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}\n")

    variants = _variants(args.steps, args.unrolls, args.chunk)
    craft = craft_problem(args.weights, args.batch)
    rows = run_section(
        f"Crafting step, ResNet-20, batch {args.batch}, {args.steps} steps, median "
        f"of {args.repeats}", craft, args.steps, args.repeats, variants,
        ("poison-it/s", args.batch),
    )
    if not args.no_flags and args.flags:
        flag_rows = run_flag_variants(args)
        if flag_rows:
            print_table("Crafting step under XLA flags (separate processes)",
                        [("host", dict(rows)["host"])] + flag_rows,
                        ("poison-it/s", args.batch))
    if not args.no_train:
        train_variants = [v for v in variants if v[0] in
                          ("host", "scan", f"chunks{args.chunk}-full", "host+canon",
                           "scan+canon")]
        run_section(
            f"Training step (SGD, train-mode BN), ResNet-20, batch {args.train_batch},"
            f" {args.train_steps} steps", train_problem(args.weights, args.train_batch),
            args.train_steps, args.repeats,
            [v for v in train_variants
             if v[1] != "chunks-full" or args.train_steps % v[2] == 0],
            ("images/s", args.train_batch),
        )

if __name__ == "__main__":
    main()
