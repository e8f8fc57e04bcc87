"""Poison Frogs crafting throughput: our JAX crafter against PyTorch, same CPU.

Times Algorithm 1 of Shafahi et al. (2018) in its l_inf form (gradient step on
||f(x) - f(t)||^2, then projection into the eps-ball around the base and [0, 1]),
with a fixed step size so that every variant takes exactly `--iterations` steps per
poison, on CIFAR ResNet-20 (option-A shortcuts) with the shipped weights, in one
process:

  torch per-base     one base at a time in a Python loop, a batch of 1 per step
                     (as poisoning-benchmark's craft_poisons_fc.py crafts),
  torch batched      all bases in one tensor per step,
  jax per-base       `jax.jit(fc.craft)` called once per base (a batch of 1),
  jax jit(craft)     `jax.jit(fc.craft)` on all bases: one program, a while loop,
  jax host-step      a Python loop over a jitted `fc.make_step` step on all bases,
  jax per-core       one CPU device per core: with whole setups per device,
                     `craft` under `sweep.sharding.per_device`, each device crafting
                     its setups in turn (as frogs_benchmark does); with one setup,
                     each device crafts a share of its bases (13 + 12 of 25), one
                     jitted `craft` call per device, dispatched together.

Why per-core: XLA:CPU runs ResNet-20's 32- and 64-channel convolutions on one
thread (measured: the same time with one core as with two), so one JAX device per
core is how a JAX program uses a whole CPU; the other JAX variants run on device 0
of that same process. `--cpu-devices 1` makes one device (per-core = jit(craft)).

The torch model is written out below and loads the same npz state dict; its features
are checked against ours first. Both frameworks compute only the input gradient
(torch parameters have `requires_grad=False`). Every variant includes the target
features and the watermarked start.

The rate is poison-iterations per second (poisons x iterations / wall time), the
median over `--repeats` timed runs, after one untimed warm-up run (compilation);
variants are timed round-robin, each after a `SETTLE_S` pause (untimed) so that no
thread of the previous variant still spins on a core. The per-base loops take the
same time per poison whatever the batch, so they run on the first `--loop-bases`
bases only.
`max|dx|` compares a variant's poisons with the first row's, on the common bases.

FLOP/s: XLA's cost analysis of the compiled batched step (flops per step) times each
variant's rate, against the measured float32 matmul peak (median of timed `jnp.dot`s
of two n x n matrices, counted as 2 n^3 flops). The step is costed as the model's
own arithmetic, traced under `narrow_convolutions()`: the reshapes that route narrow
convolutions to YNNPACK compute some zeros, which do not count.

Needs torch (the `bench` extra: pip install -e .[bench]). Usage:
  python benchmarks/crafting.py                     # B = 25 and 250, about 4 min
  python benchmarks/crafting.py --bases 25 --iterations 10 --repeats 2
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxpoison.attacks import feature_collision as fc  # noqa: E402
from jaxpoison.distributed import split_cpu_into_devices  # noqa: E402
from jaxpoison.models import load_pretrained, shipped_weights  # noqa: E402
from jaxpoison.models.conv import narrow_convolutions  # noqa: E402
from jaxpoison.sweep.sharding import per_device, shard_trials, trial_mesh  # noqa: E402

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SETUP_BASES = 25  # bases per benchmark setup, all poisoning one target
# LOOP_MODES: on this VM the torch per-base loop (2 threads, batch 1, thousands of
# tiny ops) runs either at ~330-396 poison-it/s or, for stretches, at ~215-265 (seen
# with no JAX work running, and with the pause below), so the table also gives each
# rate against the loop's fastest repeat ("/its best").
# Idle time before each timed call, so that threads still spinning after the previous
# variant cannot slow the next.
SETTLE_S = 0.2


# --- the PyTorch reference -----------------------------------------------------------
class BasicBlock(nn.Module):
    """Two 3x3 convs; option A shortcut: subsample, zero-pad the channels."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = (cout // 4) if (stride != 1 or cin != cout) else 0

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if self.pad:
            x = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(y + x)


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (akamaster layout); `forward` returns the 64-d features."""

    def __init__(self, blocks: int = 3, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        cin = 16
        for stage, cout in enumerate((16, 32, 64)):
            layers = []
            for b in range(blocks):
                stride = 2 if stage > 0 and b == 0 else 1
                layers.append(BasicBlock(cin, cout, stride))
                cin = cout
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layers))
        self.linear = nn.Linear(64, num_classes)
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))

    def forward(self, x):
        x = (x - self.mean) / self.std
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return x.mean(dim=(2, 3))


def torch_resnet20(path: str) -> ResNet20:
    net = ResNet20()
    with np.load(path) as npz:
        state = {k: torch.from_numpy(npz[k]) for k in npz.files}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if set(missing) - {"mean", "std"} or unexpected:
        raise SystemExit(f"weights do not fit: {missing} {unexpected}")
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


def torch_craft(net, bases, targets, cfg: fc.FCConfig):
    """Algorithm 1 (l_inf, fixed step) on a batch; NCHW tensors in [0, 1]."""
    with torch.no_grad():
        target_features = net(targets)
        x = cfg.watermark * targets + (1 - cfg.watermark) * bases
        x = torch.clamp(bases + torch.clamp(x - bases, -cfg.epsilon, cfg.epsilon), 0, 1)
    for _ in range(cfg.iterations):
        x.requires_grad_(True)
        loss = ((net(x) - target_features) ** 2).sum()
        (grad,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            x = x - cfg.step_size * grad
            x = bases + torch.clamp(x - bases, -cfg.epsilon, cfg.epsilon)
            x = torch.clamp(x, 0, 1)
    return x.detach()


def torch_per_base(net, bases, targets, cfg):
    pairs = zip(bases, targets, strict=True)
    return torch.cat([torch_craft(net, b[None], t[None], cfg) for b, t in pairs])


# --- JAX ----------------------------------------------------------------------------
def jax_host_step(model, variables, cfg):
    step = jax.jit(fc.make_step(model, variables, cfg))

    @jax.jit
    def start(bases, targets):
        return fc.init(bases, targets, cfg), fc.target_features(
            model, variables, targets
        )

    def run(bases, targets):
        state, features = start(bases, targets)
        for _ in range(cfg.iterations):
            state = step(state, bases, features)
        return state.x

    return run, step


def jax_per_core(model, variables, cfg):
    """`craft` on every device at once.

    Whole setups per device when they divide evenly: `per_device` on a mesh of every
    device, each crafting its setups one after another, 25 bases per batch (as
    frogs_benchmark does). Otherwise the bases split into near-equal shares (25 on 2
    devices: 13 + 12), one jitted `craft` per device, all dispatched before any is
    awaited so that they run at once.
    """
    mesh = trial_mesh()

    def by_setup(b, t):
        shape = (-1, SETUP_BASES, *b.shape[1:])
        x = jax.lax.map(
            lambda bt: fc.craft(model, variables, bt[0], bt[1], cfg)[0],
            (b.reshape(shape), t.reshape(shape)),
        )
        return x.reshape(b.shape)

    setups = jax.jit(per_device(by_setup, mesh, (True, True)))
    share = jax.jit(lambda b, t: fc.craft(model, variables, b, t, cfg)[0])
    devices = list(mesh.devices.flat)

    def run(bases, targets):
        n = len(bases)
        if n % (SETUP_BASES * mesh.size) == 0:
            return setups(*shard_trials((bases, targets), mesh))
        parts = [
            share(jax.device_put(bases[i], d), jax.device_put(targets[i], d))
            for i, d in zip(
                np.array_split(np.arange(n), mesh.size), devices, strict=True
            )
        ]
        return np.concatenate([np.asarray(x) for x in parts])

    return run, mesh.size


def jax_per_base(craft, bases, targets):
    return jnp.concatenate(
        [craft(bases[i : i + 1], targets[i : i + 1]) for i in range(len(bases))]
    )


# --- measurement --------------------------------------------------------------------
def to_numpy(x) -> np.ndarray:
    """NHWC numpy from a NCHW torch tensor or a NHWC jax array (waits for it)."""
    if isinstance(x, torch.Tensor):
        return x.numpy().transpose(0, 2, 3, 1)
    return np.asarray(jax.block_until_ready(x))


def timed(fn):
    time.sleep(SETTLE_S)
    t = time.perf_counter()
    out = to_numpy(fn())
    return time.perf_counter() - t, out


def matmul_peak(n: int, repeats: int) -> float:
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        dot(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def flops_per_call(jitted, *args) -> float:
    cost = jitted.lower(*args).compile().cost_analysis()
    if isinstance(cost, list | tuple):  # older jax: one dict per computation
        cost = cost[0] if cost else None
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bases", type=int, nargs="+", default=[25, 250])
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loop-bases", type=int, default=SETUP_BASES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--matmul", type=int, default=2048)
    parser.add_argument("--weights", default=shipped_weights())
    parser.add_argument("--json", default="", help="also write results here")
    parser.add_argument(
        "--cpu-devices",
        type=int,
        default=0,
        help="JAX CPU devices for the per-core variant (0: one per core)",
    )
    args = parser.parse_args()
    split_cpu_into_devices(args.cpu_devices)  # before JAX starts its backends

    torch.set_num_threads(args.threads)
    cfg = fc.FCConfig(
        step_rule="fixed",
        constraint="linf",
        iterations=args.iterations,
        step_size=0.001,
        watermark=0.3,
    )
    model, variables = load_pretrained("resnet20", args.weights)
    net = torch_resnet20(args.weights)
    print(
        f"jax {jax.__version__} ({jax.devices()[0].platform}), torch "
        f"{torch.__version__} (intra-op threads {torch.get_num_threads()}, "
        f"inter-op {torch.get_num_interop_threads()}), {os.cpu_count()} CPUs, "
        f"{jax.device_count()} JAX CPU device(s) for per-core, "
        f"{platform.processor() or platform.machine()}"
    )

    rng = np.random.default_rng(0)
    check = rng.uniform(size=(8, 32, 32, 3)).astype(np.float32)
    ours = np.asarray(model.apply(variables, check)[1])
    with torch.no_grad():
        theirs = net(torch.from_numpy(check.transpose(0, 3, 1, 2))).numpy()
    diff = float(np.abs(ours - theirs).max())
    print(
        f"feature check on {len(check)} images: max|f_jax - f_torch| = {diff:.2e} "
        f"(|f| up to {np.abs(ours).max():.2f})"
    )
    if not diff < 1e-4:
        raise SystemExit("the torch model does not match ours")

    craft = jax.jit(functools.partial(fc.craft, model, variables, config=cfg))
    craft_x = lambda b, t: craft(b, t)[0]
    host, step = jax_host_step(model, variables, cfg)
    per_core, _ = jax_per_core(model, variables, cfg)
    peak = matmul_peak(args.matmul, 10)
    print(f"float32 matmul peak ({args.matmul}^2, jnp.dot): {peak / 1e9:.1f} GFLOP/s")
    results = {"config": vars(args), "feature_diff": diff, "matmul_flops": peak}

    for b in args.bases:
        setups = -(-b // SETUP_BASES)
        images = rng.uniform(size=(b + setups, 32, 32, 3)).astype(np.float32)
        bases, targets = images[:b], np.repeat(images[b:], SETUP_BASES, axis=0)[:b]
        tb, tt = (
            torch.from_numpy(a.transpose(0, 3, 1, 2).copy()) for a in (bases, targets)
        )
        jb, jt = jnp.asarray(bases), jnp.asarray(targets)
        nl = min(b, args.loop_bases)
        variants = {  # name: (poisons, fn)
            "torch per-base": (nl, lambda: torch_per_base(net, tb[:nl], tt[:nl], cfg)),
            "torch batched": (b, lambda: torch_craft(net, tb, tt, cfg)),
            "jax per-base": (nl, lambda: jax_per_base(craft_x, jb[:nl], jt[:nl])),
            "jax jit(craft)": (b, lambda: craft_x(jb, jt)),
            "jax host-step": (b, lambda: host(jb, jt)),
            "jax per-core": (b, lambda: per_core(bases, targets)),
        }
        outputs, compile_s = {}, {}
        for name, (_, fn) in variants.items():
            compile_s[name], outputs[name] = timed(fn)
        times = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, (_, fn) in variants.items():
                times[name].append(timed(fn)[0])
        state = fc.init(jb, jt, cfg)
        features = fc.target_features(model, variables, jt)
        with narrow_convolutions():  # the model's own flops, not the reshaped ones
            plain_step = jax.jit(fc.make_step(model, variables, cfg))
            step_flops = flops_per_call(plain_step, state, jb, features)

        first = outputs["torch per-base"]
        rate = {
            name: n * cfg.iterations / statistics.median(times[name])
            for name, (n, _) in variants.items()
        }
        ref_loop, ref_batch = rate["torch per-base"], rate["torch batched"]
        # The loop's fastest repeat: a conservative reference (see LOOP_MODES).
        best_loop = nl * cfg.iterations / min(times["torch per-base"])
        print(
            f"\nB = {b} bases ({setups} setup(s)), {cfg.iterations} iterations, "
            f"median of {args.repeats}; per-base loops on {nl} bases"
        )
        head = (
            f"{'variant':<16} {'poison-it/s':>11} {'/torch loop':>11} "
            f"{'/its best':>9} {'/torch batch':>12} {'first run s':>11} {'max|dx|':>8}"
        )
        print(head + "\n" + "-" * len(head))
        rows = []
        for name, (n, _) in variants.items():
            m = min(n, len(first))
            dx = float(np.abs(outputs[name][:m] - first[:m]).max())
            row = {
                "variant": name,
                "poisons": n,
                "rate": rate[name],
                "vs_torch_loop": rate[name] / ref_loop,
                "vs_torch_loop_best": rate[name] / best_loop,
                "vs_torch_batched": rate[name] / ref_batch,
                "first_run_s": compile_s[name],
                "times_s": times[name],
                "max_dx": dx,
            }
            rows.append(row)
            print(
                f"{name:<16} {fmt_rate(rate[name]):>11} "
                f"{row['vs_torch_loop']:>10.2f}x {row['vs_torch_loop_best']:>8.2f}x "
                f"{row['vs_torch_batched']:>11.2f}x "
                f"{compile_s[name]:>11.2f} {dx:>8.1e}"
            )
        achieved = step_flops * rate["jax host-step"] / b
        craft_achieved = step_flops * rate["jax jit(craft)"] / b
        core_achieved = step_flops * rate["jax per-core"] / b
        print(
            f"XLA cost analysis: {step_flops / 1e9:.2f} GFLOP per step of {b} "
            f"({step_flops / b / 1e6:.1f} MFLOP per poison-iteration); achieved "
            f"{achieved / 1e9:.1f} GFLOP/s host-step, {craft_achieved / 1e9:.1f} "
            f"GFLOP/s jit(craft), {core_achieved / 1e9:.1f} GFLOP/s per-core = "
            f"{achieved / peak:.0%} / {craft_achieved / peak:.0%} / "
            f"{core_achieved / peak:.0%} of the matmul peak"
        )
        results[f"B={b}"] = {
            "rows": rows,
            "step_flops": step_flops,
            "achieved_flops": {
                "host-step": achieved,
                "jit(craft)": craft_achieved,
                "per-core": core_achieved,
            },
            "load_avg": os.getloadavg(),
        }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
