"""Feature-collision poisons (Poison Frogs, Shafahi et al. 2018), as pure steps.

A poison x starts at its base image b (optionally watermarked with the target t) and
minimises ||f(x) - f(t)||^2, the distance of its penultimate features to the target's,
while staying close to b:

  * Algorithm 1 ("prox"), forward-backward splitting:
      forward   x^ = x - lr * grad_x ||f(x) - f(t)||^2
      backward  x  = (x^ + lr * beta * b) / (1 + lr * beta),
    with beta = beta0 * (feature_dim / input_dim)^2 (beta0 = 0.25), or a given
    `beta` (the benchmark's port uses beta = 0.1 on [0, 1] pixels), pixels in [0, 1].
  * "linf": after the forward step, project into the eps-ball around b and [0, 1]
    (the poisoning benchmark's variant, Schwarzschild et al. 2021, eps = 8/255).

Watermarking (Sec. 4.2): b <- g * t + (1 - g) * b before optimisation, opacity g. As
in the benchmark's craft_poisons_fc.py, the start is the watermarked base itself: the
first gradient is taken there, before any projection; each step then projects into
the l_inf ball centred on the ORIGINAL base. (So a poison with zero iterations is the
watermarked base, which may lie outside the ball, as the benchmark's would.)

Step-size rules:
  * "fixed": lr throughout.
  * "benchmark": the benchmark's craft_poisons_fc.py. If the objective at x exceeds
    the last accepted objective, the step is rejected and lr *= 0.2; otherwise it is
    accepted, and crafting stops when ||x - x_new|| / ||x|| < 1e-5.
  * "paper": an adaptive rule after the released Poison Frogs code: every step is
    accepted; once 40 objectives are recorded, lr is halved at each step whose
    objective exceeds the mean of the last 40. The released code
    (ashafahi/inceptionv3-transferLearn-poison, `do_optimization`) differs: it
    evaluates the objective at the NEW point with unsquared norms, compares it only
    at iterations 0 and 1 mod 40 (Python 2's `iter % M/2 == 0`), and then rejects
    the step as well as halving lr.
  The logged objective is ||f(x) - f(t)||^2 at the current x, plus (prox) beta
  ||x_new - b||^2 at the new one, as the benchmark logs it.

Every poison carries its own step size, objective history and `done` flag, so a batch
of poisons (many bases, many targets, many problems) advances in one vmapped step and
finished poisons are masked, never waited on. A poison is done at `iterations` or when
its feature distance ||f(x) - f(t)|| falls below `stop_distance`.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxpoison.checks import check_finite_number, check_unit_images
from jaxpoison.errors import UserInputError
from jaxpoison.models import Model

HISTORY = 40  # the paper's rule compares with the mean of the last 40 objectives


@dataclasses.dataclass(frozen=True)
class FCConfig:
    """Feature-collision crafting settings (static).

    Attributes:
      iterations: maximum steps per poison.
      step_size: lr (the initial one for the adaptive rules).
      step_rule: "fixed", "benchmark" or "paper".
      constraint: "linf" (project into the eps-ball) or "prox" (Algorithm 1).
      epsilon: l_inf radius in pixels for "linf".
      beta0: "prox" weight is beta0 * (feature_dim / input_dim)^2, unless `beta`.
      beta: the "prox" weight itself when > 0 (0: from `beta0`).
      watermark: opacity g of the target blended into the base; 0 = none.
      stop_distance: stop a poison once ||f(x) - f(t)|| is below this; 0 = never.
      tolerance: the benchmark rule's relative-change stopping tolerance.
    """

    iterations: int = 120
    step_size: float = 0.001
    step_rule: str = "benchmark"
    constraint: str = "linf"
    epsilon: float = 8 / 255
    beta0: float = 0.25
    beta: float = 0.0
    watermark: float = 0.3
    stop_distance: float = 0.0
    tolerance: float = 1e-5

    def __post_init__(self):
        if self.step_rule not in ("fixed", "benchmark", "paper"):
            raise UserInputError(
                f"unknown step rule {self.step_rule!r}: fixed, benchmark, paper"
            )
        if self.constraint not in ("linf", "prox"):
            raise UserInputError(f"unknown constraint {self.constraint!r}: linf, prox")
        if not 0.0 <= self.watermark < 1.0:
            raise UserInputError(f"watermark opacity {self.watermark} not in [0, 1)")
        for field in (
            "step_size",
            "epsilon",
            "beta0",
            "beta",
            "stop_distance",
            "tolerance",
        ):
            check_finite_number(getattr(self, field), f"FCConfig.{field}")
        if self.iterations < 0 or self.step_size <= 0 or self.epsilon < 0:
            raise UserInputError("iterations >= 0, step_size > 0, epsilon >= 0 needed")
        if self.beta < 0:
            raise UserInputError(f"beta {self.beta} < 0 (0 means beta0's scaling)")


class FCState(NamedTuple):
    """Per-poison crafting state; every field has a leading poison axis."""

    x: jax.Array  # current poisons (P, H, W, C)
    step_size: jax.Array  # (P,)
    last_objective: jax.Array  # (P,) last accepted objective (benchmark rule)
    history: jax.Array  # (P, HISTORY) recent objectives (paper rule)
    iteration: jax.Array  # (P,) steps taken
    done: jax.Array  # (P,) bool
    distance: jax.Array  # (P,) ||f(x) - f(t)|| at the last evaluated x


def watermark(base: jax.Array, target: jax.Array, opacity: float) -> jax.Array:
    """b <- g * t + (1 - g) * b (Shafahi et al. 2018, Sec. 4.2)."""
    return opacity * target + (1.0 - opacity) * base


def prox_beta(config: FCConfig, feature_dim: int, input_dim: int) -> float:
    """beta = beta0 * (feature_dim / input_dim)^2 (Shafahi et al. 2018, Sec. 3), or
    `config.beta` when given."""
    if config.beta:
        return config.beta
    return config.beta0 * (feature_dim / input_dim) ** 2


def proximal_step(x_hat, base, lr, beta):
    """Algorithm 1's backward step: argmin_x beta ||x - b||^2 + ||x - x^||^2 / lr."""
    lr = lr.reshape((-1,) + (1,) * (x_hat.ndim - 1))
    return (x_hat + lr * beta * base) / (1.0 + lr * beta)


def project_linf(x, base, epsilon):
    """Into the eps-ball around `base`, then into [0, 1]."""
    return jnp.clip(base + jnp.clip(x - base, -epsilon, epsilon), 0.0, 1.0)


def check_problem(bases, targets) -> None:
    """Bases and targets: float (P, H, W, C) in [0, 1], one target per base."""
    check_unit_images(bases, "bases")
    check_unit_images(targets, "targets")
    if np.shape(bases) != np.shape(targets):
        raise UserInputError(
            f"one target per base is needed: bases {np.shape(bases)} vs targets "
            f"{np.shape(targets)} (repeat one target for many bases)"
        )


def init(bases: jax.Array, targets: jax.Array, config: FCConfig) -> FCState:
    """Poisons at their (watermarked) bases; one target per base.

    Not projected: the benchmark takes its first gradient at the watermarked base
    and projects only the first step's result (module docstring).
    """
    check_problem(bases, targets)
    x = watermark(bases, targets, config.watermark) if config.watermark else bases
    p = bases.shape[0]
    dtype = bases.dtype
    return FCState(
        x=x,
        step_size=jnp.full((p,), config.step_size, dtype),
        last_objective=jnp.full((p,), jnp.inf, dtype),
        history=jnp.full((p, HISTORY), jnp.nan, dtype),
        iteration=jnp.zeros((p,), jnp.int32),
        done=jnp.zeros((p,), bool) | (config.iterations == 0),
        distance=jnp.full((p,), jnp.inf, dtype),
    )


def make_step(model: Model, variables, config: FCConfig, input_shape=None):
    """The crafting step `step(state, bases, target_features) -> state`.

    `bases` (P, H, W, C) are the ORIGINAL bases; `target_features` (P, D) the
    target's features for each poison. The step is pure and vmappable.
    """

    def objective(x, target_features):
        features = model.apply(variables, x, train=False)[1]
        per_poison = jnp.sum((features - target_features) ** 2, axis=-1)
        return per_poison.sum(), per_poison

    def step(state: FCState, bases, target_features) -> FCState:
        (_, sq_distance), grad = jax.value_and_grad(objective, has_aux=True)(
            state.x, target_features
        )
        obj = sq_distance  # the objective at the current x, as the benchmark logs it
        lr = state.step_size
        x_hat = state.x - lr.reshape((-1, 1, 1, 1)) * grad
        if config.constraint == "linf":
            x_new = project_linf(x_hat, bases, config.epsilon)
        else:
            input_dim = int(np.prod(bases.shape[1:]))
            beta = prox_beta(config, target_features.shape[-1], input_dim)
            x_new = jnp.clip(proximal_step(x_hat, bases, lr, beta), 0.0, 1.0)
            obj = obj + beta * jnp.sum((x_new - bases) ** 2, axis=(1, 2, 3))
        accept = jnp.ones_like(state.done)
        step_size = lr
        stop = jnp.zeros_like(state.done)
        if config.step_rule == "benchmark":
            accept = obj <= state.last_objective
            step_size = jnp.where(accept, lr, lr * 0.2)
            change = jnp.linalg.norm((state.x - x_new).reshape(len(obj), -1), axis=1)
            size = jnp.linalg.norm(state.x.reshape(len(obj), -1), axis=1)
            stop = accept & (change / size < config.tolerance)
        elif config.step_rule == "paper":
            recent = jnp.nanmean(state.history, axis=1)
            full = ~jnp.isnan(state.history).any(axis=1)
            step_size = jnp.where(full & (obj > recent), lr * 0.5, lr)
        distance = jnp.sqrt(sq_distance)
        if config.stop_distance:
            stop = stop | (distance < config.stop_distance)
        iteration = state.iteration + 1
        new = FCState(
            x=jnp.where(accept[:, None, None, None], x_new, state.x),
            step_size=step_size,
            last_objective=jnp.where(accept, obj, state.last_objective),
            history=jnp.concatenate([state.history[:, 1:], obj[:, None]], axis=1),
            iteration=iteration,
            done=stop | (iteration >= config.iterations),
            distance=distance,
        )
        # Finished poisons keep their state: masking, not waiting.
        keep = state.done
        return jax.tree.map(
            lambda old, upd: jnp.where(
                keep.reshape((-1,) + (1,) * (upd.ndim - 1)), old, upd
            ),
            state,
            new,
        )

    return step


def target_features(model: Model, variables, targets: jax.Array) -> jax.Array:
    """Penultimate features of the targets (eval mode)."""
    return model.apply(variables, targets, train=False)[1]


def craft(
    model: Model, variables, bases, targets, config: FCConfig
) -> tuple[jax.Array, FCState]:
    """Crafts one poison per base, each toward its own target, in one program.

    Args:
      bases: (P, H, W, C) base images in [0, 1].
      targets: (P, H, W, C) the target each poison collides with (repeat one
        target for many bases; stack many targets for many problems).

    Returns:
      (poisons, final state). Runs a `lax.while_loop` that ends when every poison
      is done, so it is pure and jit/vmap-able (not reverse-differentiable).
    """
    step = make_step(model, variables, config)
    features = target_features(model, variables, targets)
    state = init(bases, targets, config)
    state = jax.lax.while_loop(
        lambda s: ~jnp.all(s.done), lambda s: step(s, bases, features), state
    )
    return state.x, state
