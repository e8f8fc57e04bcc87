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

# Measured with benchmarks/scan_vs_host.py (see README "Speed"): on XLA:CPU a
# convolutional step runs several times slower inside a while-loop body than as a
# top-level jitted call; on GPU/TPU a single program avoids per-step dispatch.
PREFERRED = {"cpu": "step"}


def is_traced(tree) -> bool:
    """Whether any leaf is a tracer (we are inside jit, vmap or grad)."""
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def choose(loop: str, config, args) -> str:
    """The loop to run: "scan" under tracing; else `loop`, or by backend for "auto"."""
    if is_traced(args):
        return "scan"
    if loop != "auto":
        return loop
    if getattr(config, "mode", None) == "linear" and not getattr(config, "augment", 1):
        return "scan"  # steps on cached features are tiny: dispatch would dominate.
    return PREFERRED.get(jax.default_backend(), "scan")


def _epoch(trainer, state, variables, data, epoch):
    idx, weights = trainer.batches(state.key, epoch)

    def body(s, batch):
        return trainer.step(s, variables, data, *batch)

    return jax.lax.scan(body, state, (idx, weights))


@functools.lru_cache(maxsize=64)
def _jitted(trainer):
    """Jitted pieces of a trainer, cached so repeated runs compile once."""
    return (
        jax.jit(trainer.batches),
        jax.jit(trainer.step),
        jax.jit(functools.partial(_epoch, trainer)),
    )


def drive(trainer, state, variables, data, how: str, batch_axis: bool = False):
    """Runs `trainer.epochs` epochs from `state`.

    Returns:
      (state, sums): per-step metric sums stacked as (epochs, steps[, trials]).
    """
    del batch_axis  # the vmapped trainer already puts trials behind the step axis.
    if how == "scan":
        return jax.lax.scan(
            lambda s, e: _epoch(trainer, s, variables, data, e),
            state,
            jnp.arange(trainer.epochs),
        )
    batches, step, epoch = _jitted(trainer)
    per_epoch = []
    for e in range(trainer.epochs):
        if how == "epoch":
            state, sums = epoch(state, variables, data, e)
        else:
            idx, weights = batches(state.key, e)
            steps = []
            for i in range(trainer.steps_per_epoch):
                state, sums_i = step(state, variables, data, idx[i], weights[i])
                steps.append(sums_i)
            sums = jax.tree.map(lambda *xs: jnp.stack(xs), *steps)
        per_epoch.append(sums)
    if not per_epoch:
        return state, (np.zeros((0, trainer.steps_per_epoch)),) * 3
    return state, jax.tree.map(lambda *xs: jnp.stack(xs), *per_epoch)
