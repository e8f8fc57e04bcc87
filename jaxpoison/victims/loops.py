"""Loop drivers: one training (or crafting) loop, run three ways behind one interface.

* "scan": the whole run is one XLA program (nested `lax.scan` over epochs and steps).
  Required when a gradient flows through the loop or the caller is tracing (vmap,
  grad, jit); the norm on accelerators.
* "step": a Python loop calling one jitted (possibly vmapped) step.
* "epoch": a Python loop calling one jitted epoch (a `lax.scan` over its steps).

`choose` picks one; see `PREFERRED` for the measured per-backend rule.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

LOOPS = ("auto", "scan", "step", "epoch")

# On XLA:CPU a jitted epoch (its steps under `lax.scan`) trained ResNet-20 1.16x
# faster than a host loop of jitted steps (`benchmarks/train_loops.py`, README
# "Speed": per-call dispatch and argument handling of a 157-leaf state); that once
# ran the other way, before `models/conv.py` kept scanned convolutions on YNNPACK.
# Per epoch, not one scan of the whole run, so a long training returns to Python
# between epochs. On GPU/TPU a single program avoids per-step dispatch.
PREFERRED = {"cpu": "epoch"}


def _cached_features(config) -> bool:
    """Linear victims on cached features (see victims.config.uses_cached_features)."""
    return (
        getattr(config, "mode", None) == "linear"
        and (
            not getattr(config, "augment", True)
            or getattr(config, "cache_augmented_features", False)
        )
        and not (getattr(config, "input_mixup", 0) or getattr(config, "cutout", 0))
    )


def is_traced(tree) -> bool:
    """Whether any leaf is a tracer (we are inside jit, vmap or grad)."""
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def choose(loop: str, config, args) -> str:
    """The loop to run: "scan" under tracing; else `loop`, or by backend for "auto"."""
    if is_traced(args):
        return "scan"
    if loop != "auto":
        return loop
    if _cached_features(config):
        return "scan"  # steps on cached features are tiny: dispatch would dominate.
    return PREFERRED.get(jax.default_backend(), "scan")


TRIALS = ("auto", "vmap", "map")
# Measured with benchmarks/victim_training.py on the 2-core CPU: 8 vmapped
# end-to-end ResNet-20 trainings ran ~6x slower than the same 8 in sequence (vmap
# turns per-trial kernels into grouped convolutions); with cached features, steps
# are tiny and batching trials wins.
PREFERRED_TRIALS = {"cpu": "map"}


def choose_trials(trials: str, config) -> str:
    """ "vmap" or "map" for many trials; "auto" decides by backend and step kind."""
    if trials not in TRIALS:
        raise ValueError(f"trials must be one of {TRIALS}, not {trials!r}")
    if trials != "auto":
        return trials
    if _cached_features(config):
        return "vmap"
    return PREFERRED_TRIALS.get(jax.default_backend(), "vmap")


def _epoch(trainer, state, variables, data, epoch):
    idx, weights = trainer.batches(state.key, epoch)

    def body(s, batch):
        return trainer.step(s, variables, data, *batch)

    return jax.lax.scan(body, state, (idx, weights))


def _scan_all(trainer, state, variables, data):
    return jax.lax.scan(
        lambda s, e: _epoch(trainer, s, variables, data, e),
        state,
        jnp.arange(trainer.epochs),
    )


@functools.lru_cache(maxsize=64)
def _jitted(trainer):
    """Jitted pieces of a trainer, cached so repeated runs compile once."""
    return {
        "init": jax.jit(trainer.init),
        "batches": jax.jit(trainer.batches),
        "step": jax.jit(trainer.step),
        "epoch": jax.jit(functools.partial(_epoch, trainer)),
        "scan": jax.jit(functools.partial(_scan_all, trainer)),
    }


def init(trainer, variables, data, key):
    """`trainer.init`, jitted and cached."""
    return _jitted(trainer)["init"](variables, data, key)


def drive(trainer, state, variables, data, how: str):
    """Runs `trainer.epochs` epochs from `state`.

    Returns:
      (state, sums): per-step metric sums stacked as (epochs, steps[, trials]).
    """
    fns = _jitted(trainer)
    if how == "scan":
        return fns["scan"](state, variables, data)
    per_epoch = []
    for e in range(trainer.epochs):
        if how == "epoch":
            state, sums = fns["epoch"](state, variables, data, e)
        else:
            idx, weights = fns["batches"](state.key, e)
            steps = []
            for i in range(trainer.steps_per_epoch):
                state, sums_i = fns["step"](state, variables, data, idx[i], weights[i])
                steps.append(sums_i)
            sums = jax.tree.map(lambda *xs: jnp.stack(xs), *steps)
        per_epoch.append(sums)
    if not per_epoch:
        return state, (np.zeros((0, trainer.steps_per_epoch)),) * 3
    return state, jax.tree.map(lambda *xs: jnp.stack(xs), *per_epoch)
