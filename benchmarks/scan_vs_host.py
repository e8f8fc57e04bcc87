"""Why ResNet steps run slower inside `lax.scan` than as host-looped jit calls (CPU).

Times, in one process, the same ResNet-20 step driven these ways:

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

Rates are median steps/s over timed runs (`runs`; a variant is not re-run once its
runs took 15 s), compilation excluded (reported apart); all variants of a table
are compiled first and then timed round-robin;
`max|diff|` compares each variant's final state with the first row's.
`load` is the highest 1-minute load average seen after a variant's runs: this script
alone keeps about 2 cores busy, so a value well above the core count means the
machine was shared and absolute rates are low (ratios suffer less, being timed
round-robin, and the `naive` counts not at all).

Usage:
  python benchmarks/scan_vs_host.py                  # everything, about 4 min
  python benchmarks/scan_vs_host.py --steps 8 --batch 32 --repeats 3 --sections craft
  python benchmarks/scan_vs_host.py --sections flags --flags default legacy-runtime
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jaxpoison.models.conv import stock_convolutions  # noqa: E402

DEFAULT_WEIGHTS = str(
    Path(__file__).resolve().parents[1]
    / "jaxpoison"
    / "assets"
    / "resnet20_cifar10.npz"
)
FLAG_VARIANTS = {
    "default": "",
    "legacy-runtime": "--xla_cpu_use_thunk_runtime=false",
    "fast-math": "--xla_cpu_enable_fast_math=true",
    "eigen-1-thread": "--xla_cpu_multi_thread_eigen=false",
    "onednn": "--xla_cpu_use_onednn=true",
    "no-small-while": (
        "--xla_backend_extra_options=xla_cpu_small_while_loop_byte_threshold=0"
    ),
}


@contextlib.contextmanager
def canonical_convs():
    """Canonical-gradient convolutions (the models' default, jaxpoison/models/conv.py);
    variants without "+canon" are traced under `stock_convolutions()`."""
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


def prepare(step, x0, kind, steps, k=1, canon=False) -> dict:
    """Compile one variant; returns what `time_once` needs plus compile stats."""
    fn, calls = make_driver(step, kind, steps, k)
    t0 = time.perf_counter()
    with canonical_convs() if canon else stock_convolutions():
        compiled = jax.jit(fn).lower(x0).compile()
    return {
        "compiled": compiled,
        "calls": calls,
        "steps": steps,
        "compile_s": time.perf_counter() - t0,
        "naive": naive_convs(compiled.as_text()),
        "times": [],
        "loads": [],
    }


def time_once(v: dict, x0) -> None:
    x = x0
    t = time.perf_counter()
    for _ in range(v["calls"]):
        x = v["compiled"](x)
    jax.block_until_ready(x)
    v["times"].append(time.perf_counter() - t)
    v["loads"].append(os.getloadavg()[0])
    v["out"] = x


def measure_all(step, x0, specs, repeats, log=True, budget_s=15.0) -> list:
    """Compile every variant, then time them round-robin, `repeats` rounds, so
    that load from other processes hits all variants alike. Variants made of
    several calls get one warm-up call; single-call (whole-scan) ones do not. A
    variant whose runs already took `budget_s` is not run again."""
    rows = [
        (name, prepare(step, x0, kind, steps, k, canon))
        for name, kind, steps, k, canon in specs
    ]
    for _, v in rows:
        if v["calls"] > 1:
            jax.block_until_ready(v["compiled"](x0))
    for _ in range(repeats):
        for _, v in rows:
            if sum(v["times"]) < budget_s:
                time_once(v, x0)
    for name, v in rows:
        v["its"] = v["steps"] / statistics.median(v["times"])
        v["runs"] = len(v["times"])
        v["load"] = max(v["loads"])
        v["diff"] = max_diff(v["out"], rows[0][1]["out"])
        if log:
            print(f"  measured {name:<16} {v['its']:8.2f} steps/s", flush=True)
    return rows


def max_diff(a, b) -> float:
    leaves = jax.tree.leaves(jax.tree.map(lambda u, v: jnp.max(jnp.abs(u - v)), a, b))
    return float(max(leaves))


def _variants(steps, unrolls, chunk):
    out = [("host", "host", 1, False), ("scan", "scan", 1, False)]
    out += [(f"scan-unroll{u}", "scan", u, False) for u in unrolls]
    out += [
        (f"chunks{chunk}", "chunks", chunk, False),
        (f"chunks{chunk}-full", "chunks-full", chunk, False),
        ("host+canon", "host", 1, True),
        ("scan+canon", "scan", 1, True),
    ]
    chunked = ("chunks", "chunks-full")
    return [v for v in out if v[1] not in chunked or steps % v[2] == 0]


def run_section(title, problem, steps, repeats, variants, per_item):
    step, x0 = problem
    specs = [(name, kind, steps, k, canon) for name, kind, k, canon in variants]
    rows = measure_all(step, x0, specs, repeats)
    print_table(title, rows, per_item)
    return rows


def print_table(title, rows, per_item):
    base = dict(rows).get("host", rows[0][1])["its"]
    print(f"\n{title}")
    print(
        f"{'variant':<24}{'steps/s':>9}{per_item[0]:>12}{'vs host':>9}"
        f"{'naive':>7}{'compile s':>11}{'runs':>5}{'load':>6}{'max|diff|':>11}"
    )
    for name, r in rows:
        diff = f"{r['diff']:11.1e}" if "diff" in r else ""
        print(
            f"{name:<24}{r['its']:9.2f}{r['its'] * per_item[1]:12.0f}"
            f"{r['its'] / base:9.2f}{r['naive']:7d}{r['compile_s']:11.1f}"
            f"{r['runs']:5d}{r['load']:6.1f}{diff}"
        )
    print()


def flag_worker(args) -> None:
    """In a subprocess with XLA_FLAGS already set: host and scan crafting."""
    step, x0 = craft_problem(args.weights, args.batch)
    specs = [(kind, kind, args.steps, 1, False) for kind in ("host", "scan")]
    keep = ("its", "compile_s", "naive", "runs", "load")
    out = {
        name: {key: v[key] for key in keep}
        for name, v in measure_all(step, x0, specs, args.repeats, log=False)
    }
    print("RESULT " + json.dumps(out), flush=True)


def run_flag_variants(args) -> list:
    rows = []
    for name in args.flags:
        env = dict(os.environ)
        flags = env.get("XLA_FLAGS", "") + " " + FLAG_VARIANTS[name]
        env["XLA_FLAGS"] = flags.strip()
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            "--steps",
            str(args.flag_steps),
            "--batch",
            str(args.batch),
            "--repeats",
            str(args.repeats),
            "--weights",
            args.weights,
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not found:
            err = (proc.stderr.strip().splitlines() or ["?"])[-1][:70]
            print(f"  flag {name}: failed ({err})", flush=True)
            continue
        res = json.loads(found[-1][len("RESULT ") :])
        for line in proc.stderr.splitlines():
            if "no longer supported" in line or "nknown flag" in line:
                print(f"  flag {name}: XLA says: {line.split('] ')[-1][:70]}")
        for kind in ("host", "scan"):
            rows.append((f"{kind} [{name}]", res[kind]))
        print(
            f"  flag {name:<16} host {res['host']['its']:7.2f}  scan "
            f"{res['scan']['its']:7.2f} steps/s",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8, help="crafting steps per run")
    p.add_argument("--batch", type=int, default=32, help="poisons per step")
    p.add_argument("--repeats", type=int, default=3, help="timed runs (median)")
    p.add_argument("--unrolls", type=int, nargs="*", default=[2, 4])
    p.add_argument("--chunk", type=int, default=4, help="steps per jitted chunk")
    p.add_argument(
        "--train-steps",
        type=int,
        default=2,
        help="training steps per run (scan runs ~10 s per step)",
    )
    p.add_argument("--train-batch", type=int, default=128)
    p.add_argument("--train-repeats", type=int, default=3)
    p.add_argument(
        "--flags",
        nargs="*",
        default=list(FLAG_VARIANTS),
        choices=list(FLAG_VARIANTS),
        help="XLA flag variants to run",
    )
    p.add_argument(
        "--sections",
        nargs="*",
        default=["craft", "flags", "train"],
        choices=["craft", "flags", "train"],
        help="what to run",
    )
    p.add_argument(
        "--flag-steps",
        type=int,
        default=4,
        help="crafting steps per run in the flag subprocesses",
    )
    p.add_argument("--weights", default=DEFAULT_WEIGHTS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        flag_worker(args)
        return

    print(
        f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, "
        f"python {platform.python_version()}, {os.cpu_count()} CPUs"
    )
    print(f"devices: {jax.devices()}")
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}\n")

    variants = _variants(args.steps, args.unrolls, args.chunk)
    if "craft" in args.sections:
        craft = craft_problem(args.weights, args.batch)
        run_section(
            f"Crafting step, ResNet-20, batch {args.batch}, {args.steps} steps, "
            f"median of {args.repeats}",
            craft,
            args.steps,
            args.repeats,
            variants,
            ("poison-it/s", args.batch),
        )
    if "flags" in args.sections and args.flags:
        flag_rows = run_flag_variants(args)
        if flag_rows:
            print_table(
                "Crafting step under XLA flags (one process per flag; "
                "ratios vs the first row)",
                flag_rows,
                ("poison-it/s", args.batch),
            )
    if "train" in args.sections:
        n = args.train_steps
        train_variants = [
            ("host", "host", 1, False),
            ("scan", "scan", 1, False),
            (f"chunks{n}-full", "chunks-full", n, False),
            ("host+canon", "host", 1, True),
            ("scan+canon", "scan", 1, True),
        ]
        run_section(
            f"Training step (SGD, train-mode BN), ResNet-20, batch {args.train_batch},"
            f" {n} steps, median of {args.train_repeats}",
            train_problem(args.weights, args.train_batch),
            n,
            args.train_repeats,
            train_variants,
            ("images/s", args.train_batch),
        )


if __name__ == "__main__":
    main()
