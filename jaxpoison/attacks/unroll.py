"""Unrolled victim training that `jax.grad` sees through: the bilevel metalearner.

The inner problem of a bilevel poisoning attack (MetaPoison, Huang et al. 2020,
Eq. 2; the class-shielding generator) is a few optimiser steps of a victim on a
batch that holds the poisons; the outer problem differentiates a loss at the trained
weights with respect to the poisons (or a generator's parameters). Here the inner
steps are ordinary optax updates of a pure step, run under `lax.scan` (or unrolled
in Python for a short K, see `LOOPS`), optionally rematerialised per step
(`jax.checkpoint`) so that the memory of a long unroll is one step's activations
plus the carry per step. An ensemble of surrogate victims is the same function
vmapped (or `lax.map`ped) over a leading axis of their states.

Nothing here replays training: the hypergradient is reverse-mode through the
steps' own gradients, i.e. second order through the model. The convolutions'
custom VJP (models/conv.py) is itself written in differentiable lax ops, so
grad-of-grad works through it (tests/test_unroll.py checks the hypergradient
against finite differences).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxpoison.models import Model
from jaxpoison.victims.train import weighted_loss

# "scan": one `lax.scan` over the steps (any K; the norm on accelerators).
# "python": a Python loop traced into one program (small K). On XLA:CPU a
# convolution's second-order terms inside a while-loop body miss the fast kernels
# (the first-order ones are fixed by models/conv.py; their derivatives are not),
# so short unrolls trace flat there.
LOOPS = ("scan", "python")
ENSEMBLE = ("vmap", "map")


class Learner(NamedTuple):
    """A victim mid-training: parameters, BatchNorm statistics, optimiser state."""

    params: Any
    batch_stats: Any
    opt_state: Any


class Batch(NamedTuple):
    """One step's inputs (images, or frozen features), integer labels and weights."""

    inputs: jax.Array
    labels: jax.Array
    weights: jax.Array


def variables_of(params, batch_stats) -> dict:
    """Flax variables from parameters and (possibly empty) BatchNorm statistics."""
    return {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}


def end_to_end_apply(model: Model) -> Callable:
    """`apply(params, batch_stats, images) -> (logits, new_batch_stats)`, train mode."""

    def apply(params, batch_stats, images):
        variables = variables_of(params, batch_stats)
        (logits, _), stats = model.apply_train(variables, images)
        return logits, stats

    return apply


def head_apply(model: Model) -> Callable:
    """`apply(head_params, head_stats, features) -> (logits, stats)`: a head trained
    on frozen features (the linear victim)."""

    def apply(params, batch_stats, features):
        return model.apply_head(variables_of(params, batch_stats), features, train=True)

    return apply


def make_step(apply: Callable, tx: optax.GradientTransformation) -> Callable:
    """One optax step on the weighted mean cross-entropy of a batch.

    `step(learner, batch) -> (learner, loss)`, pure; the same loss as victim training
    (`victims.train.weighted_loss`), so an unroll equals `train` step for step.
    """

    def step(learner: Learner, batch: Batch):
        def loss_fn(params):
            logits, stats = apply(params, learner.batch_stats, batch.inputs)
            loss, _ = weighted_loss(logits, batch.labels, None, batch.weights, 0.0)
            return loss, stats

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(learner.params)
        updates, opt_state = tx.update(grads, learner.opt_state, learner.params)
        params = optax.apply_updates(learner.params, updates)
        return Learner(params, stats or learner.batch_stats, opt_state), loss

    return step


def init_learner(params, batch_stats, tx: optax.GradientTransformation) -> Learner:
    return Learner(params, batch_stats, tx.init(params))


def unroll(
    step: Callable,
    learner: Learner,
    xs,
    make_batch: Callable = lambda b: b,
    observe: Callable | None = None,
    loop: str = "scan",
    remat: bool = False,
):
    """K steps of `step`, differentiable in everything they read.

    Args:
      step: `step(learner, batch) -> (learner, loss)` (e.g. `make_step`).
      learner: the starting `Learner`.
      xs: a pytree with a leading axis K, one slice per step.
      make_batch: `make_batch(xs[k]) -> Batch`; gathers inside the step, so that a
        gradient reaches whatever it reads (e.g. poisons swapped into a batch).
      observe: optional `observe(learner) -> value`, evaluated after every step (the
        outer loss at each unrolled step, as MetaPoison averages over steps).
      loop: "scan" or "python" (see `LOOPS`).
      remat: rematerialise each step in the backward pass (`jax.checkpoint`).

    Returns:
      (learner after K steps, {"loss": (K,), "observed": (K, ...) or None}).
    """
    if loop not in LOOPS:
        raise ValueError(f"loop must be one of {LOOPS}, not {loop!r}")

    def body(carry, x):
        carry, loss = step(carry, make_batch(x))
        return carry, (loss, None if observe is None else observe(carry))

    if remat:
        body = jax.checkpoint(body)
    if loop == "scan":
        learner, (losses, observed) = jax.lax.scan(body, learner, xs)
        return learner, {"loss": losses, "observed": observed}
    k = jax.tree.leaves(xs)[0].shape[0]
    outs = []
    for i in range(k):
        learner, out = body(learner, jax.tree.map(lambda a, i=i: a[i], xs))
        outs.append(out)
    losses, observed = jax.tree.map(lambda *a: jnp.stack(a), *outs)
    return learner, {"loss": losses, "observed": observed}


def ensemble(fn: Callable, how: str = "vmap", in_axes=0) -> Callable:
    """`fn` over a leading member axis: vmapped, or `lax.map`ped (in sequence).

    On XLA:CPU vmapping per-member convolution kernels makes grouped convolutions
    that run slower than the members in sequence (victims/loops.py); elsewhere
    "vmap" batches the ensemble into every step. `in_axes` as for `jax.vmap`
    (0 or None per positional argument).
    """
    if how not in ENSEMBLE:
        raise ValueError(f"ensemble must be one of {ENSEMBLE}, not {how!r}")
    if how == "vmap":
        return jax.vmap(fn, in_axes=in_axes)

    def mapped(*args):
        axes = in_axes if isinstance(in_axes, tuple) else (in_axes,) * len(args)
        shared = [a if ax is None else None for a, ax in zip(args, axes, strict=True)]
        per = [a if ax is not None else None for a, ax in zip(args, axes, strict=True)]

        def one(member):
            full = [s if p is None else p for s, p in zip(shared, member, strict=True)]
            return fn(*full)

        return jax.lax.map(one, per)

    return mapped
