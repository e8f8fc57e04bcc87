"""Convex Polytope and Bullseye Polytope poisons, as pure steps.

Both attacks craft k poisons x_1..x_k from bases b_1..b_k (one target t, one
problem) so that the target's features f(t) sit inside, or at the centre of, the
poisons' feature polytope, and a linear head retrained on the poisons puts t on
the poisons' side:

  * Convex Polytope (Zhu et al. 2019, Algorithm 1), "cp":
      min_x  1/2 ||f(t) - sum_i c_i f(x_i)||^2 / ||f(t)||^2
      with c on the probability simplex. Each outer step first solves for c at
      the current poisons (the inner loop: projected gradient on the simplex,
      warm-started from the previous step's c), then takes a gradient step on x
      with c held fixed.
  * Bullseye Polytope (Aghakhani et al. 2021), "bp": the coefficients
      are fixed at 1/k, so the target is pulled to the polytope's centre:
      min_x  ||f(t) - (1/k) sum_i f(x_i)|| / ||f(t)||.

With an ensemble of feature extractors f^(1..m) (the papers' substitute nets),
each member has its own coefficients and the objective is the members' mean.

The poisons step as the poisoning benchmark's craft_poisons_cp.py and
craft_poisons_bp.py do (Schwarzschild et al. 2021): Adam (lr 0.04, betas
(0.9, 0.999)) on the poisons in the benchmark's *normalised* coordinates
z = (x - mean) / std, so in pixels each channel moves by lr * std_c per unit Adam
step; after every step the poisons are projected into the l_inf eps-ball around
their bases and into [0, 1]. Poisons start at their bases (no watermark).
Optional step decays multiply lr by `decay_ratio` at the listed iterations.

Every field of the state belongs to one problem; many problems (setups) are
batched with `jax.vmap` or `jax.lax.map` over `craft` or over init/step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxpoison.attacks.feature_collision import project_linf
from jaxpoison.checks import check_finite_number, check_unit_images
from jaxpoison.errors import UserInputError

# Normalisation of CIFAR-10 in the benchmark's crafting scripts: Adam steps live in
# the coordinates it defines (learning_module.data_mean_std_dict["cifar10"]).
BENCHMARK_CIFAR10_STD = (0.2023, 0.1994, 0.2010)

FeatureFn = Callable[[jax.Array], jax.Array]  # images (k, H, W, C) -> (k, D)


@dataclasses.dataclass(frozen=True)
class PolytopeConfig:
    """Polytope crafting settings (static); defaults are the benchmark's.

    Attributes:
      method: "cp" (Convex Polytope) or "bp" (Bullseye Polytope).
      iterations: outer steps (the benchmark: 1200; Zhu et al.: 4000;
        Aghakhani et al., linear transfer: 800).
      step_size: Adam's lr in normalised coordinates (0.04 everywhere).
      momentum: Adam's beta1 (0.9).
      beta2: Adam's beta2 (0.999).
      adam_eps: Adam's epsilon (1e-8, PyTorch's default).
      step_std: per-channel std of the normalised coordinates Adam steps in.
      decay_iterations: iterations at which lr is multiplied by decay_ratio.
      decay_ratio: see decay_iterations.
      epsilon: l_inf radius around the bases, in pixels (the benchmark: 8/255).
      coefficient_tol: the inner loop stops when the coefficients' relative
        change falls below this (1e-6)...
      coefficient_iterations: ...or after this many steps (10000).
    """

    method: str = "bp"
    iterations: int = 1200
    step_size: float = 0.04
    momentum: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    step_std: tuple[float, ...] = BENCHMARK_CIFAR10_STD
    decay_iterations: tuple[int, ...] = ()
    decay_ratio: float = 0.1
    epsilon: float = 8 / 255
    coefficient_tol: float = 1e-6
    coefficient_iterations: int = 10000

    def __post_init__(self):
        if self.method not in ("cp", "bp"):
            raise UserInputError(f"unknown polytope method {self.method!r}: cp, bp")
        for field in (
            "step_size",
            "momentum",
            "beta2",
            "adam_eps",
            "decay_ratio",
            "epsilon",
            "coefficient_tol",
        ):
            check_finite_number(getattr(self, field), f"PolytopeConfig.{field}")
        if self.iterations < 0 or self.coefficient_iterations < 1:
            raise UserInputError("iterations >= 0 and coefficient_iterations >= 1")
        if self.step_size <= 0 or self.epsilon < 0:
            raise UserInputError("step_size > 0 and epsilon >= 0 needed")
        if not (0 <= self.momentum < 1 and 0 <= self.beta2 < 1):
            raise UserInputError("Adam's momentum and beta2 must be in [0, 1)")
        if not self.step_std or min(self.step_std) <= 0:
            raise UserInputError("step_std: one positive std per channel")


class PolytopeState(NamedTuple):
    """One problem's crafting state (k poisons toward one target)."""

    x: jax.Array  # poisons (k, H, W, C) in [0, 1]
    opt_state: optax.OptState  # Adam's, in normalised coordinates
    coefficients: jax.Array  # (m, k): each ensemble member's simplex weights
    iteration: jax.Array  # () steps taken
    loss: jax.Array  # () objective at the last evaluated x (before its step)
    solver_steps: jax.Array  # () inner-loop steps of the last coefficient solve


def project_simplex(v: jax.Array) -> jax.Array:
    """Euclidean projection of `v` (n,) onto {c : c >= 0, sum c = 1}.

    The sort-based rule (Held et al. 1974; Duchi et al. 2008, Fig. 1): with u the
    entries sorted descending, rho = max{j : u_j - (sum_{i<=j} u_i - 1) / j > 0}
    and theta = (sum_{i<=rho} u_i - 1) / rho, the projection is max(v - theta, 0).
    """
    u = jnp.sort(v)[::-1]
    excess = jnp.cumsum(u) - 1.0
    j = jnp.arange(1, v.shape[-1] + 1, dtype=v.dtype)
    rho = jnp.max(jnp.where(u - excess / j > 0, j, 0)).astype(jnp.int32)
    theta = excess[rho - 1] / rho.astype(v.dtype)
    return jnp.maximum(v - theta, 0.0)


def simplex_least_squares(
    a: jax.Array,
    b: jax.Array,
    init: jax.Array,
    tol: float = 1e-6,
    max_steps: int = 10000,
) -> tuple[jax.Array, jax.Array]:
    """argmin_{c in simplex} ||a c - b||^2: Zhu et al. 2019, Algorithm 1's inner loop.

    Projected gradient descent from `init` with step 1 / L, L the largest
    eigenvalue of a^T a (so every step decreases the objective; the benchmark
    instead estimates L from one random vector and halves a 2 / L step when the
    objective rises: the same fixed point). Stops when
    ||c - c_new|| / max(||c||, 1e-8) < tol, or after `max_steps`.

    Args:
      a: (D, k) the poisons' features as columns.
      b: (D,) the target's features.
      init: (k,) a point on the simplex (the previous solution).

    Returns:
      (c, steps taken).
    """
    gram = a.T @ a
    rhs = a.T @ b
    lipschitz = jnp.linalg.eigvalsh(gram)[-1]
    step = 1.0 / jnp.maximum(lipschitz, jnp.finfo(a.dtype).tiny)

    def cond(carry):
        _, steps, change = carry
        return (steps < max_steps) & (change >= tol)

    def body(carry):
        c, steps, _ = carry
        new = project_simplex(c - step * (gram @ c - rhs))
        change = jnp.linalg.norm(c - new) / jnp.maximum(jnp.linalg.norm(c), 1e-8)
        return new, steps + 1, change

    c, steps, _ = jax.lax.while_loop(
        cond, body, (init, jnp.zeros((), jnp.int32), jnp.array(jnp.inf, a.dtype))
    )
    return c, steps


def cp_loss(features, target_features, coefficients):
    """1/2 ||f(t) - sum_i c_i f(x_i)||^2 / ||f(t)||^2 (Zhu et al. 2019)."""
    residual = target_features - coefficients @ features
    return 0.5 * jnp.sum(residual**2) / jnp.sum(target_features**2)


def bp_loss(features, target_features):
    """||f(t) - mean_i f(x_i)|| / ||f(t)|| (Aghakhani et al. 2021)."""
    centre = jnp.mean(features, axis=0)
    return jnp.linalg.norm(centre - target_features) / jnp.linalg.norm(target_features)


def optimizer(config: PolytopeConfig) -> optax.GradientTransformation:
    """Adam with the benchmark's betas and its step decays."""
    schedule = optax.piecewise_constant_schedule(
        config.step_size, {int(i): config.decay_ratio for i in config.decay_iterations}
    )
    return optax.adam(
        schedule, b1=config.momentum, b2=config.beta2, eps=config.adam_eps
    )


def target_features(feature_fns: Sequence[FeatureFn], target: jax.Array):
    """Each ensemble member's features of the target (H, W, C): a tuple of (D_j,)."""
    return tuple(f(target[None])[0] for f in feature_fns)


def init(
    bases: jax.Array, target_feats: Sequence[jax.Array], config: PolytopeConfig
) -> PolytopeState:
    """Poisons at their bases, coefficients at 1/k (the benchmark's start).

    Args:
      bases: (k, H, W, C) in [0, 1].
      target_feats: `target_features(...)`, one entry per ensemble member.
    """
    check_unit_images(bases, "bases")
    if len(config.step_std) != bases.shape[-1]:
        raise UserInputError(
            f"step_std has {len(config.step_std)} channels, bases {bases.shape[-1]}"
        )
    k, dtype = bases.shape[0], bases.dtype
    return PolytopeState(
        x=bases,
        opt_state=optimizer(config).init(bases),
        coefficients=jnp.full((len(target_feats), k), 1.0 / k, dtype),
        iteration=jnp.zeros((), jnp.int32),
        loss=jnp.array(jnp.inf, dtype),
        solver_steps=jnp.zeros((), jnp.int32),
    )


def objective(
    feature_fns: Sequence[FeatureFn], config: PolytopeConfig, target_feats
) -> Callable:
    """`loss(x, coefficients) -> (loss, (coefficients, solver steps))`: the
    ensemble's mean objective; for "cp" the coefficients are first re-solved at
    the current poisons (no gradient flows through the solve, as in Algorithm 1)."""

    def loss(x, coefficients):
        losses, solved, steps = [], [], []
        for f, t, c in zip(feature_fns, target_feats, coefficients, strict=True):
            feats = f(x)
            if config.method == "cp":
                c, n = simplex_least_squares(
                    jax.lax.stop_gradient(feats).T,
                    t,
                    c,
                    config.coefficient_tol,
                    config.coefficient_iterations,
                )
                losses.append(cp_loss(feats, t, c))
                steps.append(n)
            else:
                losses.append(bp_loss(feats, t))
            solved.append(c)
        n_steps = jnp.max(jnp.stack(steps)) if steps else jnp.zeros((), jnp.int32)
        return jnp.mean(jnp.stack(losses)), (jnp.stack(solved), n_steps)

    return loss


def make_step(
    feature_fns: Sequence[FeatureFn], config: PolytopeConfig
) -> Callable[[PolytopeState, jax.Array, tuple], PolytopeState]:
    """The crafting step `step(state, bases, target_feats) -> state` (pure).

    `bases` are the (k, H, W, C) original bases, centre of the eps-ball;
    `target_feats` is `target_features(feature_fns, target)`.
    """
    opt = optimizer(config)
    std = jnp.asarray(config.step_std).reshape(1, 1, 1, -1)  # channels last

    def step(state: PolytopeState, bases, target_feats) -> PolytopeState:
        loss_fn = objective(feature_fns, config, target_feats)
        (loss, (coefficients, steps)), grad = jax.value_and_grad(loss_fn, has_aux=True)(
            state.x, state.coefficients
        )
        # d/dz = d/dx * std for z = (x - mean) / std: Adam runs on z's gradient,
        # and its step dz is dx = dz * std in pixels.
        updates, opt_state = opt.update(grad * std.astype(grad.dtype), state.opt_state)
        x_hat = state.x + updates * std.astype(grad.dtype)
        return PolytopeState(
            x=project_linf(x_hat, bases, config.epsilon),
            opt_state=opt_state,
            coefficients=coefficients,
            iteration=state.iteration + 1,
            loss=loss,
            solver_steps=steps,
        )

    return step


def craft(
    feature_fns: Sequence[FeatureFn],
    bases: jax.Array,
    target: jax.Array,
    config: PolytopeConfig,
) -> tuple[jax.Array, PolytopeState]:
    """Crafts k poisons from `bases` (k, H, W, C) toward `target` (H, W, C).

    `feature_fns`: the ensemble, each `images -> penultimate features` (for one
    white-box model, `[lambda x: model.apply(variables, x, train=False)[1]]`).
    Runs `config.iterations` steps in a `lax.fori_loop`; pure, so many problems
    batch with `jax.vmap` / `jax.lax.map`.

    Returns:
      (poisons, final state).
    """
    check_unit_images(target, "target", rank=3)
    feats = target_features(feature_fns, target)
    step = make_step(feature_fns, config)
    state = init(bases, feats, config)
    state = jax.lax.fori_loop(
        0, config.iterations, lambda _, s: step(s, bases, feats), state
    )
    return state.x, state


def polytope_residual(
    feature_fns: Sequence[FeatureFn],
    poisons: jax.Array,
    target: jax.Array,
    coefficients: jax.Array,
) -> jax.Array:
    """||f(t) - sum_i c_i f(x_i)|| / ||f(t)|| for each member (m,): how far the
    target is from the point of the poisons' polytope that `coefficients` name."""
    feats = target_features(feature_fns, target)
    out = []
    for f, t, c in zip(feature_fns, feats, coefficients, strict=True):
        out.append(jnp.linalg.norm(t - c @ f(poisons)) / jnp.linalg.norm(t))
    return jnp.stack(out)
