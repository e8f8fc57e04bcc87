"""Gradient matching / Witches' Brew (Geiping et al. 2021), as pure steps.

Clean-label poisons x_i + Delta_i (x_i base images of the poison class, their labels
y_i kept, ||Delta_i||_inf <= eps, pixels in [0, 1]) whose training gradient at a
clean-trained surrogate theta points where the adversarial target gradient points
(Eq. 3, the "similarity" loss of the authors' code):

    B(Delta) = 1 - <g_t, g_P(Delta)> / (||g_t|| ||g_P(Delta)||),
    g_t = grad_theta L(F(x_t; theta), y_adv),
    g_P = grad_theta 1/P sum_i L(F(A(x_i + Delta_i); theta), y_i),

the inner product and both norms summed over every parameter tensor (all layers),
L the cross-entropy, A a random differentiable augmentation drawn anew each step,
theta in eval mode (BatchNorm running statistics). Algorithm 1: R restarts, each
from a random start and M steps of signed Adam on Delta (Adam fed sign(grad B)),
each step projected into the eps-ball and [0, 1]; the restart with the lowest final
B is kept.

Settings from the authors' code (JonasGeiping/poisoning-gradient-matching, forest/
options.py, witchcoven/witch_base.py; the ICLR paper: tau = 0.1, R = 8, M = 250):
Adam (betas 0.9, 0.999, eps 1e-8) with learning rate tau = 0.1, x0.1 at steps
M // 2.667, M // 1.6 and M // 1.142 (forest's MultiStepLR); start Delta =
clip(N(0, 1) eps, -eps, eps) ("randn"); poisons in batches of 512 ("pbatch"), each
batch its own B, the gradients summed over batches; eps 16/255 (the paper's CIFAR-10
runs) or 8/255 (the poisoning benchmark). Forest optimises Delta in normalised units
(pixels / channel std), so a step of tau there is tau * std_c in pixels: Delta is
kept in pixels here and each step is scaled by `pixel_scale` (CIFAR-10's std).

Differences, stated: the augmentation is the victims' own random crop (zero padding
4) and horizontal flip (victims/augment.py), differentiable in the pixels, where
forest shifts by up to 4 px with bilinear interpolation (padding zero in normalised
units) and flips; the random start is projected into [0, 1] before the first step
(forest projects after it).

Every problem (a surrogate, its bases and its target gradient) carries its own
state, so many problems advance in one vmapped step (`craft`'s trial axis); the R
restarts of a problem are a leading axis of its perturbation, vmapped or unrolled
(`GMConfig.restart_batch`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jaxpoison.attacks.metapoison import project
from jaxpoison.checks import check_finite_number, check_unit_images, is_concrete
from jaxpoison.errors import UserInputError
from jaxpoison.models import Model
from jaxpoison.sweep.sharding import per_device, to_host
from jaxpoison.victims.augment import random_crop_flip

# forest/consts.py cifar10_std: the scale of forest's normalised pixel units.
CIFAR10_STD = (0.24703224003314972, 0.24348513782024384, 0.26158785820007324)
# forest's MultiStepLR milestones are M // 2.667, M // 1.6, M // 1.142.
MILESTONE_DIVISORS = (2.667, 1.6, 1.142)
INITS = ("randn", "rand", "zero")
RESTART_BATCH = ("vmap", "loop")
# Adam's direction only (torch defaults); the learning rate and its schedule scale it.
ADAM = optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)


@dataclasses.dataclass(frozen=True)
class GMConfig:
    """Crafting settings (static). Defaults: the authors' code (see module doc).

    Attributes:
      steps: M, signed-Adam steps per restart.
      restarts: R, independent restarts; the lowest final loss is kept.
      epsilon: l_inf radius in [0, 1] pixels.
      step_size: tau, Adam's learning rate in forest's normalised units.
      pixel_scale: per-channel factor turning a normalised step into pixels.
      schedule: multiply the learning rate by 0.1 at M // 2.667, M // 1.6, M // 1.142.
      init: "randn" (clipped N(0, eps^2)), "rand" (uniform in the ball) or "zero".
      augment: random crop + flip of the poisons before each gradient.
      crop_padding: zero padding of the random crop.
      poison_batch: poisons per matched batch; each batch has its own loss B.
      restart_batch: how restarts share a step: "loop" (unrolled in the traced
        step; on the 2-core CPU 2x faster than "vmap" for 4 restarts of 50 poisons
        of convnet_small, whose per-restart parameter gradients become batched
        kernels) or "vmap" (the choice on an accelerator).
    """

    steps: int = 250
    restarts: int = 8
    epsilon: float = 16 / 255
    step_size: float = 0.1
    pixel_scale: tuple[float, ...] = CIFAR10_STD
    schedule: bool = True
    init: str = "randn"
    augment: bool = True
    crop_padding: int = 4
    poison_batch: int = 512
    restart_batch: str = "loop"

    def __post_init__(self):
        object.__setattr__(self, "pixel_scale", tuple(self.pixel_scale))
        for name, value, known in (
            ("init", self.init, INITS),
            ("restart_batch", self.restart_batch, RESTART_BATCH),
        ):
            if value not in known:
                raise UserInputError(
                    f"unknown {name} {value!r}; known: {', '.join(known)}"
                )
        for field in ("epsilon", "step_size"):
            check_finite_number(getattr(self, field), f"GMConfig.{field}")
        if self.steps < 0 or self.restarts < 1 or self.poison_batch < 1:
            raise UserInputError("steps >= 0, restarts >= 1, poison_batch >= 1 needed")
        if self.epsilon < 0 or self.step_size <= 0 or self.crop_padding < 0:
            raise UserInputError("epsilon >= 0, step_size > 0, crop_padding >= 0")
        if not self.pixel_scale or min(self.pixel_scale) <= 0:
            raise UserInputError("pixel_scale: one positive factor per channel")


class GMProblem(NamedTuple):
    """One crafting problem (leading trial axis on every leaf when batched).

    variables: the surrogate, used in eval mode; bases: (P, H, W, C) in [0, 1], the
    centres of the eps-ball; labels: (P,) their (clean) labels; target_grad: g_t,
    shaped like `variables["params"]` (`target_gradient`).
    """

    variables: Any
    bases: jax.Array
    labels: jax.Array
    target_grad: Any


class GMState(NamedTuple):
    """Crafting state of one problem.

    delta: (R, P, H, W, C) perturbations in pixels, one per restart; opt_state:
    Adam's moments of delta; key: the problem's key (step s draws its augmentation
    from fold_in(key, s)); step: steps taken; loss: (R,) B at the delta each restart
    had before the last step's update (forest's score of a restart).
    """

    delta: jax.Array
    opt_state: optax.OptState
    key: jax.Array
    step: jax.Array
    loss: jax.Array


def param_dot(a, b) -> jax.Array:
    """<a, b> over every leaf of two parameter trees (summed over all layers)."""
    return sum(jax.tree.leaves(jax.tree.map(jnp.vdot, a, b)))


def cross_entropy_gradient(model: Model, variables, images, labels, weights=None):
    """grad_theta of the (weighted) mean cross-entropy of `images` in eval mode."""
    if weights is None:
        weights = jnp.ones(labels.shape, images.dtype)

    def loss(params):
        logits = model.apply({**variables, "params": params}, images, train=False)[0]
        per = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.sum(weights * per) / jnp.sum(weights)

    return jax.grad(loss)(variables["params"])


def target_gradient(model: Model, variables, targets, adv_labels):
    """g_t: the gradient that moves the targets toward `adv_labels` when descended
    (forest's target_criterion "cross-entropy", targets not augmented)."""
    return cross_entropy_gradient(model, variables, targets, adv_labels)


def alignment_loss(poison_grad, target_grad) -> jax.Array:
    """B = 1 - cos(g_t, g_P), the cosine over all parameters (Eq. 3)."""
    dot = param_dot(target_grad, poison_grad)
    norms = jnp.sqrt(param_dot(target_grad, target_grad))
    norms = norms * jnp.sqrt(param_dot(poison_grad, poison_grad))
    return 1.0 - dot / norms


def matching_loss(model: Model, variables, target_grad, images, labels, weights=None):
    """B of one poison batch (images already poisoned and augmented)."""
    grad = cross_entropy_gradient(model, variables, images, labels, weights)
    return alignment_loss(grad, target_grad)


def batches(num_poisons: int, poison_batch: int) -> tuple[int, int]:
    """(batches, poisons per batch): forest's poison loader in fixed shapes."""
    per = min(poison_batch, num_poisons)
    return math.ceil(num_poisons / per), per


def poison_objective(model: Model, config: GMConfig, problem: GMProblem, delta, key):
    """(sum of B over the poison batches, their mean) for ONE restart's delta.

    The sum is what a step descends (forest accumulates the batches' gradients);
    the mean is what it reports. The last batch is padded with zero-weight rows.
    """
    x = problem.bases + delta
    if config.augment:
        x = random_crop_flip(key, x, config.crop_padding)
    n = x.shape[0]
    count, per = batches(n, config.poison_batch)
    pad = count * per - n
    weights = jnp.concatenate([jnp.ones(n, x.dtype), jnp.zeros(pad, x.dtype)])
    x = jnp.pad(x, ((0, pad),) + ((0, 0),) * 3)
    labels = jnp.pad(problem.labels, (0, pad))
    losses = [
        matching_loss(
            model,
            problem.variables,
            problem.target_grad,
            x[c * per : (c + 1) * per],
            labels[c * per : (c + 1) * per],
            weights[c * per : (c + 1) * per],
        )
        for c in range(count)
    ]
    total = sum(losses)
    return total, total / count


def milestones(steps: int) -> tuple[int, ...]:
    """forest's learning-rate milestones for M = `steps` (float floor division)."""
    return tuple(int(steps // d) for d in MILESTONE_DIVISORS)


def learning_rate(config: GMConfig, step) -> jax.Array:
    """tau, x0.1 for every milestone <= step (PyTorch MultiStepLR semantics)."""
    if not config.schedule:
        return jnp.asarray(config.step_size, jnp.float32)
    drops = jnp.sum(jnp.asarray(step) >= jnp.asarray(milestones(config.steps)))
    return config.step_size * 0.1**drops


def check_problem(problems: GMProblem, config: GMConfig) -> None:
    """Bases (T, P, H, W, C) float in [0, 1] (checked when concrete), one label
    each, a pixel scale per channel."""
    shape = np.shape(problems.bases)
    if len(shape) != 5:
        raise UserInputError(
            f"bases need a leading trial axis, (T, P, H, W, C); got shape {shape}"
        )
    bases = problems.bases
    flat = np.reshape(bases, (-1, *shape[2:])) if is_concrete(bases) else bases[0]
    check_unit_images(flat, "bases")
    if np.shape(problems.labels) != shape[:2]:
        raise UserInputError(
            f"one label per base: bases {shape}, labels {np.shape(problems.labels)}"
        )
    if len(config.pixel_scale) not in (1, shape[-1]):
        raise UserInputError(
            f"pixel_scale has {len(config.pixel_scale)} factors for {shape[-1]} "
            "channels"
        )


def init(problem: GMProblem, config: GMConfig, key) -> GMState:
    """R random starts in the eps-ball around the bases (one problem)."""
    bases = problem.bases
    key, start_key = jax.random.split(key)
    shape = (config.restarts, *bases.shape)
    eps = config.epsilon
    if config.init == "randn":
        delta = jax.random.normal(start_key, shape, bases.dtype) * eps
    elif config.init == "rand":
        delta = jax.random.uniform(start_key, shape, bases.dtype, -eps, eps)
    else:
        delta = jnp.zeros(shape, bases.dtype)
    delta = project(delta, bases[None], eps)
    return GMState(
        delta=delta,
        opt_state=ADAM.init(delta),
        key=key,
        step=jnp.zeros((), jnp.int32),
        loss=jnp.full((config.restarts,), jnp.inf, bases.dtype),
    )


def _over_restarts(fn: Callable, how: str) -> Callable:
    """`fn(delta_r, key_r) -> (a, b)` over a leading restart axis: vmapped, or a
    Python loop traced into the step (stacked)."""
    if how == "vmap":
        return jax.vmap(fn)

    def looped(delta, keys):
        outs = [fn(delta[r], keys[r]) for r in range(delta.shape[0])]
        return tuple(jnp.stack(o) for o in zip(*outs, strict=True))

    return looped


def make_step(model: Model, config: GMConfig):
    """The crafting step `step(state, problem) -> (state, aux)` of ONE problem.

    One signed-Adam step of every restart (Algorithm 1), then the projection into
    the eps-ball around the bases and [0, 1]. Pure: vmap it over problems. `aux`
    holds each restart's B before the update.
    """

    def step(state: GMState, problem: GMProblem):
        keys = jax.random.split(
            jax.random.fold_in(state.key, state.step), config.restarts
        )

        def objective(delta_r, key_r):
            return poison_objective(model, config, problem, delta_r, key_r)

        def total(delta):
            sums, means = _over_restarts(objective, config.restart_batch)(delta, keys)
            return sums.sum(), means

        (_, loss), grad = jax.value_and_grad(total, has_aux=True)(state.delta)
        # signAdam: Adam fed the gradient's sign (witch_base.py, grad.sign_()).
        updates, opt_state = ADAM.update(jnp.sign(grad), state.opt_state)
        # One factor per channel, on the last axis (no implicit rank promotion).
        scale = jnp.asarray(config.pixel_scale, state.delta.dtype)
        scale = scale.reshape((1,) * (state.delta.ndim - 1) + (-1,))
        rate = learning_rate(config, state.step).astype(state.delta.dtype) * scale
        delta = state.delta - rate * updates
        delta = project(delta, problem.bases[None], config.epsilon)
        new = GMState(delta, opt_state, state.key, state.step + 1, loss)
        return new, {"loss": loss}

    return step


def select(state: GMState, problem: GMProblem) -> tuple[jax.Array, jax.Array]:
    """(poisons, restart): the bases plus the restart with the lowest final B."""
    best = jnp.argmin(state.loss)
    return problem.bases + state.delta[best], best


@functools.lru_cache(maxsize=16)
def _programs(model: Model, config: GMConfig, mesh: Mesh | None = None):
    """(init, step, select) over a trial axis, jitted once per model, config and
    mesh; over a mesh of several devices each device runs its own trials."""
    fns = (
        jax.vmap(lambda p, k: init(p, config, k)),
        jax.vmap(make_step(model, config)),
        jax.vmap(select),
    )
    if mesh is not None and mesh.size > 1:
        fns = tuple(per_device(fn, mesh, trial_args=(True, True)) for fn in fns)
    return tuple(jax.jit(fn) for fn in fns)


def craft(
    model: Model,
    problems: GMProblem,
    config: GMConfig,
    keys,
    log: Callable[[int, np.ndarray], None] | None = None,
    mesh: Mesh | None = None,
) -> tuple[jax.Array, dict]:
    """Crafts the poisons of T problems at once (every leaf of `problems` has a
    leading trial axis T; `keys` (T,)).

    The driver loop: `init`, then `config.steps` calls of the jitted, vmapped pure
    `step` from the host (on XLA:CPU second-order convolution gradients inside a
    while loop miss the fast kernels, attacks/unroll.py), then `select`.
    `log(step, losses)` sees each step's (T, R) losses. Over a `mesh` of several
    devices (`sweep.sharding.trial_mesh`) each device crafts its share of the
    problems (`sweep.sharding.per_device`); T must then be a multiple of its size.

    Returns:
      (poisons (T, P, H, W, C), info) with info["loss"] (steps, T, R), each step's
      B per restart, and info["restart"] (T,), the kept restart.
    """
    check_problem(problems, config)
    if mesh is not None and np.shape(keys)[0] % mesh.size:
        raise UserInputError(
            f"{np.shape(keys)[0]} problems do not split over {mesh.size} devices"
        )
    init_fn, step, select_fn = _programs(model, config, mesh)
    state = init_fn(problems, keys)
    history = []
    for s in range(config.steps):
        state, aux = step(state, problems)
        history.append(to_host(aux["loss"]))  # gathered from every process
        if log is not None:
            log(s, history[-1])
    poisons, restart = select_fn(state, problems)
    shape = (0, *np.shape(state.loss))
    losses = np.stack(history) if history else np.zeros(shape, np.float32)
    return poisons, {"loss": losses, "restart": to_host(restart)}
