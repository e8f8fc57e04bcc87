"""The `Model` pair every attack and victim uses, and its Flax adapter.

A model is a NamedTuple of pure functions. Nothing outside `jaxpoison.models` touches
Flax: attacks call `apply` for logits and penultimate features (the space where
feature collision happens), victims call `apply_train` to get updated BatchNorm
statistics, and frozen-feature victims call `apply_head` on cached features.

Images enter in [0, 1] pixel space, NHWC float; normalisation is part of the model,
so every epsilon and every poison lives in pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Variables = dict[str, Any]


class Model(NamedTuple):
    """A classifier as pure functions.

    Attributes:
      init: `init(key) -> variables`, a dict with "params" and, for BatchNorm
        models, "batch_stats"; each split into "backbone" and "head".
      apply: `apply(variables, images, train=False) -> (logits, features)`;
        `features` is the penultimate layer. With `train=True` BatchNorm uses batch
        statistics (their update is discarded; use `apply_train` to keep it).
      apply_train: `apply_train(variables, images) -> ((logits, features),
        batch_stats)`, the new BatchNorm statistics ({} without BatchNorm).
      apply_head: `apply_head(head_variables, features, train=False) -> logits`
        where `head_variables` is `head_variables(variables)`; with `train=True`
        it returns `(logits, head_batch_stats)` like `apply_train`.
      name: registry name, e.g. "resnet20".
      input_shape: (H, W, C) the model was built for.
      num_classes: number of logits of the classification head.
    """

    init: Callable[[jax.Array], Variables]
    apply: Callable[..., tuple[Any, jax.Array]]
    apply_train: Callable[..., tuple[tuple[Any, jax.Array], Variables]]
    apply_head: Callable[..., Any]
    name: str
    input_shape: tuple[int, int, int]
    num_classes: int


def head_variables(variables: Variables) -> Variables:
    """The part of `variables` that `Model.apply_head` reads."""
    return {col: tree["head"] for col, tree in variables.items() if "head" in tree}


def with_head(variables: Variables, head: Variables) -> Variables:
    """`variables` with its head replaced by `head` (as from `head_variables`)."""
    out = {col: dict(tree) for col, tree in variables.items()}
    for col, tree in head.items():
        out.setdefault(col, {})["head"] = tree
    return out


class Classifier(nn.Module):
    """Normalise, run a backbone to penultimate features, then a head to logits."""

    backbone: nn.Module
    head: nn.Module
    mean: Sequence[float]
    std: Sequence[float]

    def __call__(self, images, train: bool = False):
        shape = (1,) * (images.ndim - 1) + (-1,)
        mean = jnp.asarray(self.mean).reshape(shape)
        x = (images - mean) / jnp.asarray(self.std).reshape(shape)
        features = self.backbone(x, train=train)
        return self.head(features, train=train), features


class LinearHead(nn.Module):
    """The final fully connected layer (named like PyTorch's `linear`/`fc`)."""

    num_classes: int
    layer_name: str = "linear"

    @nn.compact
    def __call__(self, features, train: bool = False):
        del train
        return nn.Dense(self.num_classes, name=self.layer_name)(features)


def from_flax(
    name: str,
    module: Classifier,
    input_shape: tuple[int, int, int],
    num_classes: int,
) -> Model:
    """Wraps a `Classifier` module as a `Model` of pure functions."""

    def init(key):
        dummy = jnp.zeros((1, *input_shape), jnp.float32)
        return dict(module.init(key, dummy, train=False))

    def apply(variables, images, train=False):
        if train:
            out, _ = module.apply(
                variables, images, train=True, mutable=["batch_stats"]
            )
            return out
        return module.apply(variables, images, train=False)

    def apply_train(variables, images):
        out, updates = module.apply(
            variables, images, train=True, mutable=["batch_stats"]
        )
        return out, dict(updates).get("batch_stats", {})

    def apply_head(head_vars, features, train=False):
        if train:
            logits, updates = module.head.apply(
                head_vars, features, train=True, mutable=["batch_stats"]
            )
            return logits, dict(updates).get("batch_stats", {})
        return module.head.apply(head_vars, features, train=False)

    return Model(init, apply, apply_train, apply_head, name, input_shape, num_classes)
