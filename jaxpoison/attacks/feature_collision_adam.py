"""Poison Frogs' Algorithm 1 with an Adam forward step (the road-sign study's).

The clean-label road-sign study crafts its poisons with Shafahi et al. 2018's
forward-backward splitting but takes the forward step with Adam at learning rate
lambda = 0.01, and uses beta = 0.25 as it stands (not rescaled by the feature and
input dimensions):

  forward   x^ = x - lambda * Adam(grad_x ||f(x) - f(t)||^2)
  backward  x  = (x^ + lambda * beta * b) / (1 + lambda * beta)   (Alg. 1, line 5)

then clipped to [0, 1]. Adam acts elementwise, so one optax state over a batch of
poisons is the same as one state per poison: many poisons (many targets) advance in
one vmapped step. `feature_collision.py` holds the paper's plain-gradient crafter.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpoison.attacks import feature_collision as fc
from jaxpoison.checks import check_finite_number
from jaxpoison.errors import UserInputError
from jaxpoison.models import Model


@dataclasses.dataclass(frozen=True)
class AdamFCConfig:
    """Settings (static).

    Attributes:
      iterations: steps per poison.
      learning_rate: lambda, Adam's learning rate and the proximal step's.
      beta: weight of ||x - b||^2 in the proximal step.
      scale_beta: use beta * (feature_dim / input_dim)^2 (Shafahi et al.'s
        scaling, beta then playing beta0) instead of beta as it stands.
      watermark: opacity of the target blended into the base first; 0 = none.
    """

    iterations: int = 300
    learning_rate: float = 0.01
    beta: float = 0.25
    scale_beta: bool = False
    watermark: float = 0.0

    def __post_init__(self):
        for name in ("learning_rate", "beta"):
            check_finite_number(getattr(self, name), f"AdamFCConfig.{name}")
        if self.iterations < 0 or self.learning_rate <= 0 or self.beta < 0:
            raise UserInputError(
                "iterations >= 0, learning_rate > 0 and beta >= 0 needed"
            )
        if not 0.0 <= self.watermark < 1.0:
            raise UserInputError(f"watermark opacity {self.watermark} not in [0, 1)")


class AdamFCState(NamedTuple):
    """Crafting state of a batch of poisons (leading poison axis)."""

    x: jax.Array  # (P, H, W, C)
    opt_state: optax.OptState
    iteration: jax.Array  # () steps taken
    distance: jax.Array  # (P,) ||f(x) - f(t)|| at the last evaluated x


def beta_of(config: AdamFCConfig, feature_dim: int, input_dim: int) -> float:
    """The proximal weight: beta, or beta * (feature_dim / input_dim)^2."""
    if config.scale_beta:
        return config.beta * (feature_dim / input_dim) ** 2
    return config.beta


def init(bases, targets, config: AdamFCConfig) -> AdamFCState:
    """Poisons at their (optionally watermarked) bases; one target per base."""
    fc.check_problem(bases, targets)
    x = fc.watermark(bases, targets, config.watermark) if config.watermark else bases
    return AdamFCState(
        x,
        optax.adam(config.learning_rate).init(x),
        jnp.zeros((), jnp.int32),
        jnp.full((bases.shape[0],), jnp.inf, bases.dtype),
    )


def make_step(model: Model, variables, config: AdamFCConfig):
    """`step(state, bases, target_features) -> state`: one Adam forward step on
    the feature distance, Algorithm 1's proximal step, a clip to [0, 1]."""
    tx = optax.adam(config.learning_rate)

    def objective(x, target_features):
        features = model.apply(variables, x, train=False)[1]
        per_poison = jnp.sum((features - target_features) ** 2, axis=-1)
        return per_poison.sum(), per_poison

    def step(state: AdamFCState, bases, target_features) -> AdamFCState:
        (_, sq), grad = jax.value_and_grad(objective, has_aux=True)(
            state.x, target_features
        )
        updates, opt_state = tx.update(grad, state.opt_state)
        x_hat = state.x + updates  # optax's updates carry -lambda
        input_dim = int(np.prod(bases.shape[1:]))
        beta = beta_of(config, target_features.shape[-1], input_dim)
        lr = jnp.full((bases.shape[0],), config.learning_rate, bases.dtype)
        x = jnp.clip(fc.proximal_step(x_hat, bases, lr, beta), 0.0, 1.0)
        return AdamFCState(x, opt_state, state.iteration + 1, jnp.sqrt(sq))

    return step


def craft(model: Model, variables, bases, targets, config: AdamFCConfig):
    """`config.iterations` steps for every poison (a `fori_loop`: jit/vmap-able).

    Returns (poisons, final state); the state's `distance` is measured where the
    last step started.
    """
    step = make_step(model, variables, config)
    features = fc.target_features(model, variables, targets)
    state = init(bases, targets, config)
    state = jax.lax.fori_loop(
        0, config.iterations, lambda _, s: step(s, bases, features), state
    )
    return state.x, state
