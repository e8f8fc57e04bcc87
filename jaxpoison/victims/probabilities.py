"""What trained victims say about images: class probabilities and per-class F1.

Every function is pure and takes victims with a leading trial axis where it says
so, so a chunk of trials is evaluated inside its own jitted program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpoison.models import Model
from jaxpoison.victims.train import class_logits


def class_probabilities(model: Model, variables, images) -> jax.Array:
    """Softmax of the class logits of one victim (eval mode): (N, K)."""
    return jax.nn.softmax(class_logits(model.apply(variables, images, train=False)[0]))


def trial_probabilities(model: Model, variables, images) -> jax.Array:
    """Class probabilities (T, N, K) of T victims (`variables` with a trial axis).

    `images` (N, H, W, C) are shown to every victim; (T, N, H, W, C) gives each
    victim its own. A `lax.map`, not a vmap: per-trial convolutions vmapped become
    grouped convolutions, several times slower on XLA:CPU.
    """
    if images.ndim == 4:
        return jax.lax.map(lambda v: class_probabilities(model, v, images), variables)
    return jax.lax.map(lambda a: class_probabilities(model, *a), (variables, images))


def f1_scores(predictions, labels, num_classes: int) -> jax.Array:
    """Per-class F1 = 2 TP / (2 TP + FP + FN) (van Rijsbergen 1979); 0 for a class
    that never occurs in either (no TP, FP or FN). Vmaps over victims."""
    classes = jnp.arange(num_classes)[:, None]
    pred = predictions[None] == classes
    true = labels[None] == classes
    tp = jnp.sum(pred & true, axis=1)
    fp = jnp.sum(pred & ~true, axis=1)
    fn = jnp.sum(~pred & true, axis=1)
    denom = 2 * tp + fp + fn
    return jnp.where(denom > 0, 2 * tp / jnp.maximum(denom, 1), 0.0)
