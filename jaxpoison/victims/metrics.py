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


def confusion_counts(
    predictions: jax.Array, labels: jax.Array, num_classes: int
) -> jax.Array:
    """(C, C) int32 counts of examples by true class (row) and prediction (column)."""
    true = jax.nn.one_hot(labels, num_classes, dtype=jnp.int32)
    pred = jax.nn.one_hot(predictions, num_classes, dtype=jnp.int32)
    return true.T @ pred


def backdoor_metrics(
    model: Model,
    variables,
    triggered: jax.Array,
    adversarial: tuple[jax.Array, jax.Array],
    poisoned_val: TrainData,
    clean_val: tuple[jax.Array, jax.Array],
) -> dict[str, jax.Array]:
    """A backdoored victim's metrics (Truong et al. 2020, Sec. 4).

    Args:
      model, variables: the victim.
      triggered: float (K, A, H, W, C): K triggered copies of the adversarial test
        (e.g. one per trigger).
      adversarial: the test images untriggered, (float images, labels).
      poisoned_val: the poison-set val split as `TrainData`, poisons swapped in
        as in training.
      clean_val: the clean-set val split, (uint8 images, labels).

    Returns:
      "triggered_confusion": (K, C, C) counts of each triggered set's images by
      true class and prediction, from which the attack success rate towards any
      poison class t and from any source classes is read on the host (ASR =
      source-class images predicted t over source-class images);
      "adversarial_clean_accuracy", "poisoned_val_accuracy", "clean_val_accuracy".
    """
    num_classes = model.num_classes
    adv_x, adv_y = adversarial

    def confusion(images):
        return confusion_counts(predict(model, variables, images), adv_y, num_classes)

    val_x, val_y, _, _, _ = poisoned_batch(
        poisoned_val, jnp.arange(poisoned_val.images.shape[0])
    )
    clean_x = clean_val[0].astype(jnp.float32) / 255.0
    return {
        "triggered_confusion": jax.lax.map(confusion, triggered),
        "adversarial_clean_accuracy": jnp.mean(
            predict(model, variables, adv_x) == adv_y
        ),
        "poisoned_val_accuracy": jnp.mean(predict(model, variables, val_x) == val_y),
        "clean_val_accuracy": jnp.mean(
            predict(model, variables, clean_x) == clean_val[1]
        ),
    }
