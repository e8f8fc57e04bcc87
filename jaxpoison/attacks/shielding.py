"""Class-shielding poison generator, trained through a dummy victim's training.

"Towards Class-Shielding Data Poisoning" (Pinkava 2023): a generator turns images of
a *shield* class into poisons that, once a victim trains on them under their
(correct) shield label, make the victim misclassify a *protected* class while it
keeps classifying the shield and *control* classes. The generator:

    z = [f(x_shield), f(x_protected)]        frozen feature extractor f (both inputs)
    h = relu(W1 z) (2048) -> relu(W2 h) (768) -> reshape 16x16x3
    r = ConvT_2(ConvT_1(h))                   two transposed convolutions up to H x W
    poison = bound(x_shield, r)               residual on the shield image

`bound` keeps pixels valid: "clip" = clip(x_shield + r, 0, 1) (the original adds the
residual unbounded; the clip only makes it an image, its gradient is zero where a
pixel saturates) or "tanh" = x_shield + tanh(r) * m with m = min(eps, 1 - x) where
tanh(r) > 0 and min(eps, x) elsewhere: smooth, inside [0, 1] and the l_inf ball.

Each outer step (the authors' train_step): a dummy victim, the frozen extractor
with a freshly initialised linear head (reset every step), is trained on the step's
poisons labelled with their shield class, in sub-batches of 10 (one optimiser step
per sub-batch; Keras Adam, lr 1e-3, as the original). Then

    L = ((CE(poisons, shield) + CE(x_control, y_control)) / 2
         + t * flippedCE(x_protected, y_protected)) / 2,
    flippedCE = -mean_i sum_c y_ic log(1 - p_ic),

and the generator takes an Adam step on grad L, the gradient flowing through the
whole unrolled training of the head (attacks/unroll.py). The TensorFlow original
could not differentiate through the dummy victim's training (GradientTape does not
trace another model's optimiser steps) and regenerated the poisons instead, so only
the CE(poisons) term reached the generator.

`clean_per_sub_batch` optionally mixes clean images of the non-shield classes
(true labels) into every sub-batch, so that the dummy victim is a victim of a
poisoned dataset rather than of the poisons alone (0 = the original).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxpoison.attacks import unroll as U
from jaxpoison.errors import UserInputError


@dataclasses.dataclass(frozen=True)
class ShieldConfig:
    """Generator and dummy-victim settings (static).

    Attributes:
      hidden: units of the first dense layer (2048).
      latent_size: side of the latent image (16: 16 x 16 x 3 = 768 units).
      kernel_size: transposed convolutions' kernel (the original: 1).
      mid_channels: channels between the two transposed convolutions (original 3).
      zero_init: start the last transposed convolution at zero, so that the
        generator starts at the identity (poisons = shield images) and learns a
        residual from there; False = Glorot everywhere (the original).
      bound: "clip" or "tanh" (see module doc).
      epsilon: l_inf bound of "tanh".
      sub_batch: poisons per dummy-victim step (10).
      sub_batches: dummy-victim steps per outer step (10).
      clean_per_sub_batch: clean non-shield images added to each sub-batch.
      victim_optimizer: "adam" (Keras default, the original) or "sgd".
      victim_lr: dummy-victim learning rate.
      target_weight: t, weight of the flipped cross-entropy.
      generator_lr: Adam learning rate of the generator (Keras default 1e-3).
      loop, remat: the unroll's loop and rematerialisation (attacks/unroll.py).
    """

    hidden: int = 2048
    latent_size: int = 16
    kernel_size: int = 3
    mid_channels: int = 3
    zero_init: bool = True
    bound: str = "clip"
    epsilon: float = 16 / 255
    sub_batch: int = 10
    sub_batches: int = 10
    clean_per_sub_batch: int = 0
    victim_optimizer: str = "adam"
    victim_lr: float = 1e-3
    target_weight: float = 1.0
    generator_lr: float = 1e-3
    loop: str = "scan"
    remat: bool = False

    def __post_init__(self):
        if self.bound not in ("clip", "tanh"):
            raise UserInputError(f"unknown bound {self.bound!r}: clip, tanh")
        if self.victim_optimizer not in ("adam", "sgd"):
            raise UserInputError(
                f"unknown victim_optimizer {self.victim_optimizer!r}: adam, sgd"
            )
        if self.loop not in U.LOOPS:
            raise UserInputError(f"unknown loop {self.loop!r}: {', '.join(U.LOOPS)}")
        if min(self.sub_batch, self.sub_batches, self.hidden, self.latent_size) < 1:
            raise UserInputError("sub_batch, sub_batches, hidden, latent_size >= 1")

    @property
    def poisons_per_step(self) -> int:
        return self.sub_batch * self.sub_batches


def flipped_cross_entropy(probs, labels):
    """-mean_i sum_c y_ic log(1 - p_ic): 0 when the true class gets probability 0,
    growing without bound as it approaches 1 (the original's reverse CE)."""
    p_true = jnp.take_along_axis(probs, labels[:, None], axis=-1)[:, 0]
    return -jnp.mean(jnp.log1p(-jnp.minimum(p_true, 1.0 - 1e-7)))


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def shielding_loss(
    logits_poison, y_shield, logits_control, y_control, logits_prot, y_prot, t
):
    """((CE(shield) + CE(control)) / 2 + t * flippedCE(protected)) / 2."""
    ordinary = (
        cross_entropy(logits_poison, y_shield)
        + cross_entropy(logits_control, y_control)
    ) / 2
    flipped = flipped_cross_entropy(jax.nn.softmax(logits_prot), y_prot)
    return (ordinary + t * flipped) / 2


def _conv_transpose(x, kernel, stride):
    return jax.lax.conv_transpose(
        x, kernel, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def init_generator(key, feature_dim: int, image_shape, config: ShieldConfig):
    """Generator parameters (a plain pytree). Glorot-uniform kernels, zero biases,
    as Keras' Dense/Conv2DTranspose defaults; the last kernel zero if `zero_init`."""
    h, w, c = image_shape
    s = config.latent_size
    if h % s or w % s or h // s != w // s:
        raise UserInputError(
            f"image {h}x{w} is not a multiple of the {s}x{s} latent image"
        )
    glorot = jax.nn.initializers.glorot_uniform()
    k = jax.random.split(key, 4)
    ks, mid = config.kernel_size, config.mid_channels
    return {
        "dense1": {
            "kernel": glorot(k[0], (2 * feature_dim, config.hidden)),
            "bias": jnp.zeros(config.hidden),
        },
        "dense2": {
            "kernel": glorot(k[1], (config.hidden, s * s * 3)),
            "bias": jnp.zeros(s * s * 3),
        },
        "convt1": {"kernel": glorot(k[2], (ks, ks, 3, mid)), "bias": jnp.zeros(mid)},
        "convt2": {
            "kernel": glorot(k[3], (ks, ks, mid, c))
            * (0.0 if config.zero_init else 1.0),
            "bias": jnp.zeros(c),
        },
    }


def residual(
    params, shield_features, protected_features, config: ShieldConfig, image_size
):
    """The generator's residual image r (N, H, W, C)."""
    s = config.latent_size
    z = jnp.concatenate([shield_features, protected_features], axis=-1)
    h = jax.nn.relu(z @ params["dense1"]["kernel"] + params["dense1"]["bias"][None])
    h = jax.nn.relu(h @ params["dense2"]["kernel"] + params["dense2"]["bias"][None])
    h = h.reshape(-1, s, s, 3)
    up = image_size // s
    # First transposed convolution doubles the latent image (16 -> 32), the second
    # covers the rest (x1 on CIFAR; x7 on 224 x 224 as the original).
    first = 2 if up % 2 == 0 else 1
    h = _conv_transpose(h, params["convt1"]["kernel"], first)
    h = h + params["convt1"]["bias"][None, None, None]
    r = _conv_transpose(h, params["convt2"]["kernel"], up // first)
    return r + params["convt2"]["bias"][None, None, None]


def bound(shield, r, config: ShieldConfig):
    """A valid image from the shield image and the residual (see module doc)."""
    if config.bound == "clip":
        return jnp.clip(shield + r, 0.0, 1.0)
    room = jnp.where(
        r > 0,
        jnp.minimum(config.epsilon, 1.0 - shield),
        jnp.minimum(config.epsilon, shield),
    )
    return shield + jnp.tanh(r) * room


def generate(params, shield, shield_features, protected_features, config: ShieldConfig):
    r = residual(params, shield_features, protected_features, config, shield.shape[1])
    return bound(shield, r, config)


class Head(NamedTuple):
    kernel: jax.Array
    bias: jax.Array


def fresh_head(key, feature_dim: int, num_classes: int) -> Head:
    """A freshly initialised linear head (Keras Dense defaults)."""
    kernel = jax.nn.initializers.glorot_uniform()(key, (feature_dim, num_classes))
    return Head(kernel, jnp.zeros(num_classes))


def head_logits(head: Head, features):
    return features @ head.kernel + head.bias[None]


def victim_optimizer(config: ShieldConfig):
    if config.victim_optimizer == "adam":
        return optax.adam(config.victim_lr, eps=1e-7)  # Keras' epsilon
    return optax.sgd(config.victim_lr)


def train_dummy_victim(head: Head, poison_features, shield_labels, clean, config):
    """The dummy victim's unrolled training: one step per sub-batch.

    `poison_features` (P, D), `shield_labels` (P,), `clean` = (features (S, C, D),
    labels (S, C)) per sub-batch, or None. Returns (head, per-step losses).
    """
    tx = victim_optimizer(config)
    n, b = config.sub_batches, config.sub_batch
    xs = (poison_features.reshape(n, b, -1), shield_labels.reshape(n, b))
    if clean is not None:
        xs = (
            jnp.concatenate([xs[0], clean[0]], axis=1),
            jnp.concatenate([xs[1], clean[1]], axis=1),
        )

    def apply(params, stats, features):
        return head_logits(params, features), stats

    def make_batch(x):
        f, y = x
        return U.Batch(f, y, jnp.ones(y.shape, f.dtype))

    learner, out = U.unroll(
        U.make_step(apply, tx),
        U.init_learner(head, {}, tx),
        xs,
        make_batch,
        loop=config.loop,
        remat=config.remat,
    )
    return learner.params, out["loss"]


class StepInputs(NamedTuple):
    """One outer step's images and cached features (P = poisons per step)."""

    shield: jax.Array  # (P, H, W, C) float in [0, 1]
    shield_features: jax.Array  # (P, D)
    shield_labels: jax.Array  # (P,)
    protected_features: jax.Array  # (P, D): generator input and loss term
    protected_labels: jax.Array  # (P,)
    control_features: jax.Array  # (Q, D)
    control_labels: jax.Array  # (Q,)
    clean: tuple | None = None  # (features (S, C, D), labels (S, C)) or None


def make_outer_loss(extract, config: ShieldConfig, num_classes: int):
    """`loss(params, inputs, key) -> (L, aux)`: generate, train a fresh head through
    the unroll, score. `extract(images) -> features` is the frozen extractor."""

    def loss(params, inputs: StepInputs, key, baseline: bool = False):
        poisons = inputs.shield
        if not baseline:  # baseline: the unmodified shield images
            poisons = generate(
                params,
                inputs.shield,
                inputs.shield_features,
                inputs.protected_features,
                config,
            )
        poison_features = extract(poisons)
        head = fresh_head(key, poison_features.shape[-1], num_classes)
        head, _ = train_dummy_victim(
            head, poison_features, inputs.shield_labels, inputs.clean, config
        )
        lp = head_logits(head, poison_features)
        lc = head_logits(head, inputs.control_features)
        lt = head_logits(head, inputs.protected_features)
        value = shielding_loss(
            lp,
            inputs.shield_labels,
            lc,
            inputs.control_labels,
            lt,
            inputs.protected_labels,
            config.target_weight,
        )
        ls = head_logits(head, inputs.shield_features)
        diff = (poisons - inputs.shield).reshape(poisons.shape[0], -1)
        aux = {
            "loss": value,
            "poison_accuracy": jnp.mean(jnp.argmax(lp, -1) == inputs.shield_labels),
            "shield_accuracy": jnp.mean(jnp.argmax(ls, -1) == inputs.shield_labels),
            "control_accuracy": jnp.mean(jnp.argmax(lc, -1) == inputs.control_labels),
            "protected_accuracy": jnp.mean(
                jnp.argmax(lt, -1) == inputs.protected_labels
            ),
            "distance_l2": jnp.mean(jnp.linalg.norm(diff, axis=-1)),
            "distance_linf": jnp.mean(jnp.abs(diff).max(axis=-1)),
        }
        return value, aux

    return loss


class GeneratorState(NamedTuple):
    """The generator in training: parameters, Adam state, outer steps taken."""

    params: dict
    opt_state: optax.OptState
    step: jax.Array  # int32 scalar


def generator_optimizer(config: ShieldConfig) -> optax.GradientTransformation:
    """Adam on the generator (Keras' defaults: lr 1e-3, epsilon 1e-7)."""
    return optax.adam(config.generator_lr, eps=1e-7)


def init(key, feature_dim: int, image_shape, config: ShieldConfig) -> GeneratorState:
    """A fresh generator (`init_generator`) and its optimiser state."""
    params = init_generator(key, feature_dim, image_shape, config)
    return GeneratorState(
        params, generator_optimizer(config).init(params), jnp.zeros((), jnp.int32)
    )


def make_step(extract, config: ShieldConfig, num_classes: int):
    """The outer step `step(state, inputs, key) -> (state, aux)`; pure and jittable.

    Generates the poisons, trains a fresh head (from `key`) through the unroll and
    takes an Adam step on the shielding loss's gradient through that training;
    `aux` holds the loss and the accuracies and distances before the update
    (`make_outer_loss`).
    """
    tx = generator_optimizer(config)
    loss = make_outer_loss(extract, config, num_classes)

    def step(state: GeneratorState, inputs: StepInputs, key):
        grads, aux = jax.grad(loss, has_aux=True)(state.params, inputs, key)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return GeneratorState(params, opt_state, state.step + 1), aux

    return step
