"""Victim training and metagradients, jaxpoison against PyTorch, side by side.

Workloads (random images and labels, the arithmetic of the real runs):
  resnet20_finetune  pretrained CIFAR ResNet-20, SGD momentum 0.9, weight decay 5e-4,
                     batch 128, random crop (pad 4) + flip inside the step
  resnet20_scratch   the same from a random initialisation
  resnet18           CIFAR ResNet-18 (poisoning benchmark's), same step, batch 128
  roadsign34_32/_64  the two-head road-sign ResNet-34 at 32 / 64 px, Adam 1e-3,
                     batch 64 (the study's), cross-entropy + L1 box loss
  linear_head        the linear victim on cached 64-d ResNet-20 features, batch 128,
                     an epoch of 100 steps per call (JAX: one `lax.scan`)
  metagrad_k2/_k4    MetaPoison's metagradient: K unrolled SGD steps (lr 0.1,
                     train-mode BatchNorm) of ResNet-20 on a batch of 50 that holds 10
                     poisons, then the cross-entropy of one target towards an
                     adversarial label at the unrolled weights, differentiated w.r.t.
                     the poisons (second order)

Modes, each timed as the median of `--steps` calls after a warm-up that compiles:
  jax 1 victim       one jitted call of TRAIN_STEPS training steps under `lax.scan`
                     (latency), state and batch already on the devices. Training
                     workloads split each batch over one CPU device per core, as
                     `victims.train` does (victims/data_parallel.py: replicated
                     state, weight gradients summed per device); metagradients and
                     the linear head run on one device, as the library runs them
  jax sweep          one victim per core: a `shard_map` over a mesh of one CPU device
                     per core (`jaxpoison.distributed.split_cpu_into_devices`), in a
                     subprocess (the device count is fixed at start-up)
  torch 1 victim     PyTorch with 2 threads (its default here)
  torch sweep        two 1-thread PyTorch processes at once (its best sweep)
  jax processes      one single-device JAX process pinned to each core, at once
                     (Linux): the most a sweep run as one process per core could
                     reach, against one process with a device per core (the
                     library's sweeps); printed under each workload's row
The modes alternate, `--repeats` times; every figure is the median over repeats, and
PyTorch's fastest repeat is given too (its rate is bimodal on this VM). Images/s
count training examples; GFLOP/s use the model's forward FLOPs from XLA's cost
analysis times 3 (forward + two backward GEMMs per layer); "% peak" is against the
best measured matmul rate (XLA and PyTorch, 2048x2048 float32) on one core for the
1-victim figures of one thread and on the whole machine otherwise.

Usage:
  python benchmarks/victim_speed.py                       # all workloads, ~1 h
  python benchmarks/victim_speed.py --workloads resnet20_finetune metagrad_k2
  python benchmarks/victim_speed.py --profile resnet20_finetune   # per-op table
  taskset -c 0 python benchmarks/victim_speed.py --worker jax --steps 3 \
      --workloads resnet20_finetune --weight_grad split_taps
      # one worker, one form of benchmarks/weight_grad.py in its steps (A/B timings;
      # --weight_grad also applies to --profile)
Needs the `bench` extra (PyTorch 2.13, CPU).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRAINING = {  # name: (model, batch, image size, optimiser, pretrained)
    "resnet20_finetune": ("resnet20", 128, 32, "sgd", True),
    "resnet20_scratch": ("resnet20", 128, 32, "sgd", False),
    "resnet18": ("resnet18", 128, 32, "sgd", False),
    "roadsign34_32": ("roadsign_resnet34", 64, 32, "adam", False),
    "roadsign34_64": ("roadsign_resnet34", 64, 64, "adam", False),
}
LINEAR = {"linear_head": 128}
LINEAR_STEPS = 100  # a linear victim's epoch: steps per timed call
TRAIN_STEPS = 4  # convolutional victims: steps per timed call (one lax.scan)
METAGRAD = {"metagrad_k2": 2, "metagrad_k4": 4}
WORKLOADS = (*TRAINING, *LINEAR, *METAGRAD)
META_BATCH, META_POISONS, META_LR = 50, 10, 0.1


def median_time(fn, steps: int) -> list[float]:
    fn()  # compile / warm up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


# ----------------------------------------------------------------------------- JAX


def jax_programs(workload: str, victims: int):
    """(call, units per call): a compiled step for `victims` victims (1: plain jit,
    a training's batch split over the devices when there are several; more: one
    per device through `per_device`), and its work in images (or metagradients)
    per call."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxpoison.sweep.sharding import per_device, trial_mesh
    from jaxpoison.victims import TrainConfig, data_parallel

    make, units = {
        **dict.fromkeys(TRAINING, _jax_training),
        **dict.fromkeys(LINEAR, _jax_linear),
        **dict.fromkeys(METAGRAD, _jax_metagrad),
    }[workload](workload)
    fn, state, inputs = make
    batch = TRAINING.get(workload, (0, 1))[1]
    mesh = data_parallel.batch_mesh(TrainConfig(batch_size=batch))
    if victims == 1 and workload in TRAINING and mesh is not None:
        jitted = jax.jit(data_parallel.traced_split(fn, mesh))
        args = (
            data_parallel.replicate(state, mesh),
            jax.device_put(inputs, NamedSharding(mesh, P(data_parallel.BATCH))),
        )
    elif victims == 1:
        jitted = jax.jit(fn)
        args = jax.device_put((state, inputs))
    else:
        mesh = trial_mesh(jax.devices()[:victims])
        stack = lambda t: jax.tree.map(lambda a: jnp.stack([a] * victims), t)  # noqa: E731
        jitted = jax.jit(
            per_device(jax.vmap(fn), mesh, (True, True)),
        )
        args = (stack(state), stack(inputs))

    def call():
        jax.block_until_ready(jitted(*args))

    call.hlo = lambda: jitted.lower(*args).compile().as_text()  # for --profile
    return call, units * victims


def _optimizer(name: str):
    import optax

    if name == "adam":
        return optax.adam(1e-3)
    return optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.01, momentum=0.9))


def _model_and_variables(name: str, image_size: int, pretrained: bool):
    import jax

    from jaxpoison.models import load_pretrained, shipped_weights, sized_model

    if pretrained:
        return load_pretrained(name, shipped_weights(name))
    model = sized_model(name, 4 if name == "roadsign_resnet34" else 10, image_size)
    return model, model.init(jax.random.key(0))


def _random_batch(batch: int, size: int, classes: int, seed: int = 0):
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.random((batch, size, size, 3), np.float32))
    labels = jnp.asarray(rng.integers(0, classes, batch))
    boxes = jnp.asarray(rng.random((batch, 4), np.float32))
    return images, labels, boxes


def _jax_training(workload: str):
    import jax
    import jax.numpy as jnp

    from jaxpoison.attacks.unroll import variables_of
    from jaxpoison.victims.augment import random_crop_flip
    from jaxpoison.victims.train import weighted_loss

    name, batch, size, opt, pretrained = TRAINING[workload]
    model, variables = _model_and_variables(name, size, pretrained)
    tx = _optimizer(opt)
    boxes = len(model.heads) > 1
    images, labels, box = _random_batch(batch, size, model.num_classes)

    def step(state, inputs):
        params, stats, opt_state, key = state
        images, labels, box = inputs
        key, crop = jax.random.split(key)
        images = random_crop_flip(crop, images)

        def loss_fn(params):
            (out, _), new = model.apply_train(
                variables_of(params, stats), images, all_heads=boxes
            )
            weights = jnp.ones(labels.shape, jnp.float32)
            loss, _ = weighted_loss(out, labels, box if boxes else None, weights, 1.0)
            return loss, new

        (_, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        return params, new_stats, opt_state, key

    def steps(state, inputs):
        return jax.lax.scan(
            lambda s, _: (step(s, inputs), None), state, None, TRAIN_STEPS
        )[0]

    params, stats = variables["params"], variables.get("batch_stats", {})
    state = (params, stats, tx.init(params), jax.random.key(1))
    return (steps, state, (images, labels, box)), batch * TRAIN_STEPS


def _jax_linear(workload: str):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    batch = LINEAR[workload]
    rng = np.random.default_rng(0)
    features = jnp.asarray(rng.standard_normal((batch, 64), np.float32))
    labels = jnp.asarray(rng.integers(0, 10, batch))
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.01, momentum=0.9))
    params = {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}

    def step(state, inputs):
        params, opt_state = state
        features, labels = inputs

        def loss_fn(p):
            logits = features @ p["w"] + p["b"]
            return optax.softmax_cross_entropy_with_integer_labels(
                logits, labels
            ).mean()

        def one(state, _):
            params, opt_state = state
            grads = jax.grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (jax.tree.map(lambda p, u: p + u, params, updates), opt_state), None

        return jax.lax.scan(one, (params, opt_state), None, LINEAR_STEPS)[0]

    return (step, (params, tx.init(params)), (features, labels)), batch * LINEAR_STEPS


def _jax_metagrad(workload: str):
    import jax
    import jax.numpy as jnp
    import optax

    from jaxpoison.attacks.unroll import (
        Batch,
        end_to_end_apply,
        init_learner,
        make_step,
        variables_of,
    )
    from jaxpoison.models import load_pretrained, shipped_weights

    k = METAGRAD[workload]
    model, variables = load_pretrained("resnet20", shipped_weights("resnet20"))
    tx = optax.sgd(META_LR)
    inner = make_step(end_to_end_apply(model), tx)
    images, labels, _ = _random_batch(META_BATCH + 1, 32, 10)
    clean, target = images[META_POISONS:META_BATCH], images[META_BATCH:]
    poisons = images[:META_POISONS]
    learner = init_learner(variables["params"], variables["batch_stats"], tx)

    def metagrad(state, inputs):
        learner, clean, target = state
        poisons, labels = inputs

        def adversarial(poisons):
            batch = Batch(
                jnp.concatenate([poisons, clean]),
                labels[:META_BATCH],
                jnp.ones(META_BATCH, jnp.float32),
            )
            trained = learner
            for _ in range(k):  # a short unroll traces flat (attacks/unroll.py)
                trained, _ = inner(trained, batch)
            logits, _ = model.apply(
                variables_of(trained.params, trained.batch_stats), target
            )
            return optax.softmax_cross_entropy_with_integer_labels(
                logits, labels[META_BATCH:]
            ).sum()

        return jax.grad(adversarial)(poisons)

    return (metagrad, (learner, clean, target), (poisons, labels)), 1


def jax_forward_flops(workload: str) -> float:
    """FLOPs of one forward pass per image, from XLA's cost analysis."""
    import jax
    import jax.numpy as jnp

    if workload in LINEAR:
        return 2 * 64 * 10
    name, _, size, _, pretrained = TRAINING.get(workload, ("resnet20", 0, 32, "", True))
    model, variables = _model_and_variables(name, size, pretrained)
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    cost = jax.jit(lambda v, x: model.apply(v, x)).lower(variables, x).compile()
    analysis = cost.cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0]
    return float(analysis["flops"])


def jax_matmul_peak() -> float:
    import jax
    import jax.numpy as jnp

    a = jnp.ones((2048, 2048), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    t = statistics.median(median_time(lambda: f(a).block_until_ready(), 5))
    return 2 * 2048**3 / t


# --------------------------------------------------------------------------- torch


def torch_models():
    import torch
    from torch import nn
    from torch.nn import functional as F  # noqa: N812

    class OptionA(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = nn.BatchNorm2d(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = nn.BatchNorm2d(cout)
            self.pad = (cout - cin) // 2 if stride != 1 or cin != cout else None

        def forward(self, x):
            y = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
            if self.pad is not None:
                x = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
            return F.relu(y + x)

    class Projection(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = nn.BatchNorm2d(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = nn.BatchNorm2d(cout)
            self.short = None
            if stride != 1 or cin != cout:
                self.short = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
                )

        def forward(self, x):
            y = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
            return F.relu(y + (x if self.short is None else self.short(x)))

    def stages(block, widths, depths, cin):
        layers = []
        for i, (w, d) in enumerate(zip(widths, depths, strict=True)):
            for b in range(d):
                layers.append(block(cin, w, 2 if i > 0 and b == 0 else 1))
                cin = w
        return nn.Sequential(*layers)

    class Net(nn.Module):
        def __init__(self, name, classes):
            super().__init__()
            self.boxes = name == "roadsign_resnet34"
            if name == "resnet20":
                self.stem = nn.Sequential(
                    nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
                )
                self.body = stages(OptionA, (16, 32, 64), (3, 3, 3), 16)
                self.fc = nn.Linear(64, classes)
            elif name == "resnet18":
                self.stem = nn.Sequential(
                    nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()
                )
                self.body = stages(Projection, (64, 128, 256, 512), (2, 2, 2, 2), 64)
                self.fc = nn.Linear(512, classes)
            else:
                self.stem = nn.Sequential(
                    nn.Conv2d(3, 64, 7, 2, 3, bias=False),
                    nn.BatchNorm2d(64),
                    nn.ReLU(),
                    nn.MaxPool2d(3, 2, 1),
                )
                self.body = stages(Projection, (64, 128, 256, 512), (3, 4, 6, 3), 64)
                self.fc = nn.Sequential(nn.BatchNorm1d(512), nn.Linear(512, classes))
                self.box = nn.Sequential(nn.BatchNorm1d(512), nn.Linear(512, 4))

        def forward(self, x):
            f = self.body(self.stem(x)).mean((2, 3))
            return (self.fc(f), self.box(f)) if self.boxes else self.fc(f)

    return torch, Net


def torch_program(workload: str):
    """(call, units per call) for one PyTorch victim in this process."""
    torch, net_class = torch_models()
    from torch.nn import functional as F  # noqa: N812

    gen = torch.Generator().manual_seed(0)
    if workload in LINEAR:
        batch = LINEAR[workload]
        fc = torch.nn.Linear(64, 10)
        opt = torch.optim.SGD(fc.parameters(), 0.01, momentum=0.9, weight_decay=5e-4)
        x, y = torch.randn(batch, 64, generator=gen), torch.randint(0, 10, (batch,))

        def call():
            for _ in range(LINEAR_STEPS):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(fc(x), y).backward()
                opt.step()

        return call, batch * LINEAR_STEPS
    if workload in METAGRAD:
        return _torch_metagrad(torch, net_class, METAGRAD[workload], gen)
    name, batch, size, opt_name, _ = TRAINING[workload]
    classes = 4 if name == "roadsign_resnet34" else 10
    net = net_class(name, classes).train()
    if opt_name == "adam":
        opt = torch.optim.Adam(net.parameters(), 1e-3)
    else:
        opt = torch.optim.SGD(net.parameters(), 0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.rand(batch, 3, size, size, generator=gen)
    y = torch.randint(0, classes, (batch,), generator=gen)
    box = torch.rand(batch, 4, generator=gen)

    def crop_flip(x):
        # Random crop (pad 4) + horizontal flip per image, as the JAX step does.
        padded = F.pad(x, (4, 4, 4, 4))
        dy = torch.randint(0, 9, (len(x),))
        dx = torch.randint(0, 9, (len(x),))
        flip = torch.rand(len(x)) < 0.5
        out = torch.stack(
            [
                padded[i, :, dy[i] : dy[i] + size, dx[i] : dx[i] + size]
                for i in range(len(x))
            ]
        )
        return torch.where(flip[:, None, None, None], out.flip(3), out)

    def call():
        opt.zero_grad(set_to_none=True)
        out = net(crop_flip(x))
        if isinstance(out, tuple):
            loss = F.cross_entropy(out[0], y) + (out[1] - box).abs().sum(1).mean()
        else:
            loss = F.cross_entropy(out, y)
        loss.backward()
        opt.step()

    return call, batch


def _torch_metagrad(torch, net_class, k: int, gen):
    from torch.func import functional_call
    from torch.nn import functional as F  # noqa: N812

    net = net_class("resnet20", 10).train()
    params = dict(net.named_parameters())
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    images = torch.rand(META_BATCH + 1, 3, 32, 32, generator=gen)
    labels = torch.randint(0, 10, (META_BATCH + 1,), generator=gen)
    poisons0 = images[:META_POISONS].clone()

    def call():
        poisons = poisons0.clone().requires_grad_(True)
        batch = torch.cat([poisons, images[META_POISONS:META_BATCH]])
        p = dict(params)
        for _ in range(k):
            loss = F.cross_entropy(
                functional_call(net, (p, buffers), (batch,)), labels[:META_BATCH]
            )
            grads = torch.autograd.grad(loss, list(p.values()), create_graph=True)
            p = {n: w - META_LR * g for (n, w), g in zip(p.items(), grads, strict=True)}
        net.eval()
        target = functional_call(net, (p, buffers), (images[META_BATCH:],))
        net.train()
        adv = F.cross_entropy(target, labels[META_BATCH:], reduction="sum")
        (grad,) = torch.autograd.grad(adv, poisons)
        return grad

    return call, 1


def torch_matmul_peak(threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    a = torch.ones(2048, 2048)
    t = statistics.median(median_time(lambda: a @ a, 5))
    return 2 * 2048**3 / t


# ------------------------------------------------------------------------- workers


def worker(args) -> None:
    """Times the workloads in this process and prints one JSON line per workload."""
    if args.pin >= 0:  # before any thread starts: every later one inherits it
        os.sched_setaffinity(0, {args.pin})
    if args.worker == "torch":
        import torch

        torch.set_num_threads(args.threads)
        for w in args.workloads:
            call, units = torch_program(w)
            times = median_time(call, args.steps)
            print(json.dumps({"workload": w, "seconds": times, "units": units}))
            sys.stdout.flush()
        return
    from jaxpoison.distributed import split_cpu_into_devices

    split_cpu_into_devices(args.devices)
    patch_weight_grad(args.weight_grad)
    for w in args.workloads:
        call, units = jax_programs(w, args.victims)
        times = median_time(call, args.steps)
        print(json.dumps({"workload": w, "seconds": times, "units": units}))
        sys.stdout.flush()


def patch_weight_grad(form: str) -> None:
    """Puts `form` of benchmarks/weight_grad.py into the library's weight gradient."""
    if form != "ours":
        from weight_grad import patch  # this folder, the script's path

        patch(form)


def run_workers(commands: list[list[str]]) -> list[dict]:
    """Runs worker processes at once; their per-workload rates, summed per workload."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    procs = [
        subprocess.Popen(c, stdout=subprocess.PIPE, text=True, env=env)
        for c in commands
    ]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a benchmark worker failed: {commands}")
    rates = collections.defaultdict(float)
    for out in outs:
        for line in out.splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                rates[r["workload"]] += r["units"] / statistics.median(r["seconds"])
    return rates


def worker_command(
    kind: str, workloads, steps: int, threads=1, victims=1, devices=1, pin=-1
):
    return [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--pin",
        str(pin),
        "--threads",
        str(threads),
        "--victims",
        str(victims),
        "--devices",
        str(devices),
        "--steps",
        str(steps),
        "--workloads",
        *workloads,
    ]


def profile(workload: str, steps: int) -> None:
    """Per-op time of one JAX victim's step (jax.profiler trace): by XLA op, then by
    (fusion kind, the JAX op it came from), read from the compiled HLO's metadata;
    e.g. ("ynn_fusion", "conv_general_dilated") is YNNPACK convolutions and
    ("ynn_fusion", "reduce_sum") BatchNorm's reductions handed to YNNPACK. Run under
    `taskset -c 0` for a one-core breakdown. A `while` event (the weight gradients'
    loops over image blocks) encloses its body's ops, which are listed too: subtract
    it from the total for the step's time."""
    import jax

    call, _ = jax_programs(workload, 1)
    per_call = TRAIN_STEPS if workload in TRAINING else 1
    call()
    origin = {
        m.group(1): m.group(2).rsplit("/", 1)[-1]
        for m in re.finditer(r'%(\S+) = .*?op_name="([^"]*)"', call.hlo())
    }
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(steps):
                call()
        trace = json.load(
            gzip.open(glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)[0])
        )
    per_op, per_kind = collections.Counter(), collections.Counter()
    for e in trace["traceEvents"]:
        if e.get("ph") == "X" and not e["name"].startswith(("Thunk", "$")):
            ms = e["dur"] / (steps * per_call) / 1e3
            base = re.sub(r"\.\d+$", "", e["name"])
            per_op[base] += ms
            per_kind[base, origin.get(e["name"], "-")] += ms
    total = sum(per_op.values())
    print(f"{workload}: {total:.1f} ms of XLA ops per training step (one victim)")
    for name, ms in per_op.most_common(20):
        print(f"  {ms:8.1f} ms  {100 * ms / total:5.1f}%  {name}")
    print("by (fusion kind, JAX op):")
    for (kind, op), ms in per_kind.most_common(20):
        print(f"  {ms:8.1f} ms  {100 * ms / total:5.1f}%  {kind} <- {op}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--profile", default=None, choices=WORKLOADS)
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--victims", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--matmul_peak", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pin", type=int, default=-1, help=argparse.SUPPRESS)
    # A weight-gradient form of benchmarks/weight_grad.py patched into the steps of
    # a jax worker or of --profile (A/B timings of a form inside training).
    parser.add_argument(
        "--weight_grad",
        default="ours",
        choices=(
            "ours",
            "channel_major",
            "pixel_major",
            "ynn_gemm",
            "row_concat",
            "split_taps",
        ),
        help=argparse.SUPPRESS,
    )
    args = parser.parse_args()
    if args.matmul_peak:
        return print(jax_matmul_peak())
    if args.worker:
        return worker(args)
    if args.profile:
        patch_weight_grad(args.weight_grad)
        return profile(args.profile, args.steps)
    unknown = sorted(set(args.workloads) - set(WORKLOADS))
    if unknown:
        raise SystemExit(f"unknown workloads {unknown}; choose from {list(WORKLOADS)}")
    cores = os.cpu_count() or 1
    ws, steps = args.workloads, args.steps
    modes = {
        "jax 1 victim": [worker_command("jax", ws, steps, devices=cores)],
        "jax sweep": [worker_command("jax", ws, steps, victims=cores, devices=cores)],
        "torch 2 threads": [worker_command("torch", ws, steps, threads=cores)],
        "torch sweep": [worker_command("torch", ws, steps) for _ in range(cores)],
    }
    if hasattr(os, "sched_setaffinity"):  # Linux: one process pinned to each core
        modes["jax processes"] = [
            worker_command("jax", ws, steps, pin=core)
            for core in sorted(os.sched_getaffinity(0))
        ]
    results = {m: collections.defaultdict(list) for m in modes}
    for r in range(args.repeats):
        for mode, commands in modes.items():
            print(f"repeat {r + 1}/{args.repeats}: {mode}", file=sys.stderr, flush=True)
            for w, rate in run_workers(commands).items():
                results[mode][w].append(rate)
    report(results, ws, cores)


def report(results, workloads, cores: int) -> None:
    import jax

    peak_core = max(jax_matmul_peak_1(), torch_matmul_peak(1))
    peak_all = max(jax_matmul_peak(), torch_matmul_peak(cores))
    print(
        f"matmul peak (2048^2 float32, best of XLA and PyTorch): {peak_core / 1e9:.0f}"
        f" GFLOP/s on one core, {peak_all / 1e9:.0f} on {cores} cores"
    )
    repeats = len(next(iter(results["jax 1 victim"].values())))
    print(f"jax {jax.__version__}; medians over {repeats} alternating repeats")
    head = (
        f"{'workload':<18}{'jax 1':>9}{'torch 2t':>10}{'ratio':>7}{'vs best':>8}"
        f"{'jax sweep':>11}{'torch sweep':>12}{'ratio':>7}{'vs best':>8}"
        f"{'GF/s 1':>8}{'%all':>6}{'GF/s sw':>9}{'%core':>6}"
    )
    print(head + "   (images/s; metagrad_*: metagradients/s)")
    for w in workloads:
        j1 = statistics.median(results["jax 1 victim"][w])
        t1 = results["torch 2 threads"][w]
        js = statistics.median(results["jax sweep"][w])
        ts = results["torch sweep"][w]
        flops = 0.0 if w in METAGRAD else 3 * jax_forward_flops(w)
        line = (
            f"{w:<18}{j1:9.1f}{statistics.median(t1):10.1f}"
            f"{j1 / statistics.median(t1):7.2f}{j1 / max(t1):8.2f}"
            f"{js:11.1f}{statistics.median(ts):12.1f}"
            f"{js / statistics.median(ts):7.2f}{js / max(ts):8.2f}"
        )
        if flops:
            line += (
                f"{j1 * flops / 1e9:8.1f}{100 * j1 * flops / peak_all:5.0f}%"
                f"{js * flops / 1e9:9.1f}{100 * js * flops / cores / peak_core:5.0f}%"
            )
        print(line)
        print(
            f"{'':<18}torch repeats: 2 threads {[round(x, 1) for x in t1]},"
            f" sweep {[round(x, 1) for x in ts]}"
        )
        if results.get("jax processes"):
            jp = statistics.median(results["jax processes"][w])
            print(
                f"{'':<18}jax processes (one pinned to each core): {jp:.1f},"
                f" {jp / statistics.median(ts):.2f}x torch sweep ({jp / max(ts):.2f}"
                f" vs best), {jp / js:.2f}x jax sweep"
            )


def jax_matmul_peak_1() -> float:
    """XLA's matmul rate on one core: a subprocess pinned to core 0."""
    out = subprocess.run(
        ["taskset", "-c", "0", sys.executable, __file__, "--matmul_peak"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return float(out.split()[-1])


if __name__ == "__main__":
    main()
