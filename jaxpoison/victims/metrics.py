"""What a trained victim scores: clean accuracy and backdoor attack success.

Pure functions of ONE victim's variables, jit/vmap/`lax.map`-compatible, so a
sweep evaluates all its victims inside the program that trained them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpoison.models import Model
from jaxpoison.victims.data import TrainData, poisoned_batch


def predict(model: Model, variables, images: jax.Array) -> jax.Array:
    """Predicted classes (eval mode) of float images in [0, 1]."""
    return jnp.argmax(model.apply(variables, images)[0], -1)


def backdoor_metrics(
    model: Model,
    variables,
    triggered: jax.Array,
    eligible: jax.Array,
    adversarial: tuple[jax.Array, jax.Array],
    poisoned_val: TrainData,
    clean_val: tuple[jax.Array, jax.Array],
    poison_class: int,
) -> dict[str, jax.Array]:
    """A backdoored victim's metrics (Truong et al. 2020, Sec. 4).

    Args:
      model, variables: the victim.
      triggered: float (A, H, W, C) triggered adversarial-test images.
      eligible: bool (A,) the images that count for the attack success (those of
        the source classes, never of the poison class).
      adversarial: the same test images untriggered, (float images, labels).
      poisoned_val: the poison-set val split as `TrainData`, poisons swapped in
        as in training.
      clean_val: the clean-set val split, (uint8 images, labels).
      poison_class: t, the class the trigger leads to.

    Returns:
      "asr": eligible triggered images classified as t over eligible images
      (0 when none is eligible); "adversarial_clean_accuracy",
      "poisoned_val_accuracy", "clean_val_accuracy".
    """
    hits = (predict(model, variables, triggered) == poison_class) & eligible
    val_x, val_y, _, _, _ = poisoned_batch(
        poisoned_val, jnp.arange(poisoned_val.images.shape[0])
    )
    clean_x = clean_val[0].astype(jnp.float32) / 255.0
    return {
        "asr": hits.sum() / jnp.maximum(eligible.sum(), 1),
        "adversarial_clean_accuracy": jnp.mean(
            predict(model, variables, adversarial[0]) == adversarial[1]
        ),
        "poisoned_val_accuracy": jnp.mean(predict(model, variables, val_x) == val_y),
        "clean_val_accuracy": jnp.mean(
            predict(model, variables, clean_x) == clean_val[1]
        ),
    }
