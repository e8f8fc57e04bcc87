"""The `Model` pair every attack and victim uses, and its Flax adapter.

A model is a NamedTuple of pure functions. Nothing outside `jaxpoison.models` touches
Flax: attacks call `apply` for logits and penultimate features (the space where
feature collision happens), victims call `apply_train` to get updated BatchNorm
statistics, and frozen-feature victims call `apply_head` on cached features.

Logits are always the classification logits, also for a model with more heads (the
road-sign ResNet-34 also regresses a box); the trainer, which needs every head's
output for its loss, asks for them all with `all_heads=True`.

Images enter in [0, 1] pixel space, NHWC float; normalisation is part of the model,
so every epsilon and every poison lives in pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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
      heads: names of the model's outputs, "class" (the logits) first. A model with
        more than one takes `all_heads=True` in `apply`, `apply_train` and
        `apply_head`, and then returns `{head: output}` where logits stand.
    """

    init: Callable[[jax.Array], Variables]
    apply: Callable[..., tuple[Any, jax.Array]]
    apply_train: Callable[..., tuple[tuple[Any, jax.Array], Variables]]
    apply_head: Callable[..., Any]
    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    heads: tuple[str, ...] = ("class",)


def class_logits(outputs):
    """The classification logits of a model's outputs: the array itself, or the
    "class" entry of an `all_heads=True` dict."""
    return outputs["class"] if isinstance(outputs, Mapping) else outputs


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
    heads: tuple[str, ...] = ("class",),
) -> Model:
    """Wraps a `Classifier` module as a `Model` of pure functions.

    A module whose head returns a dict of outputs (`heads`, "class" first) gives
    the "class" entry as logits unless the caller asks for `all_heads`.
    """

    def init(key):
        dummy = jnp.zeros((1, *input_shape), jnp.float32)
        return dict(module.init(key, dummy, train=False))

    def select(outputs, all_heads):
        if all_heads:
            return outputs if isinstance(outputs, Mapping) else {"class": outputs}
        return class_logits(outputs)

    def apply(variables, images, train=False, all_heads=False):
        if train:
            (outputs, features), _ = module.apply(
                variables, images, train=True, mutable=["batch_stats"]
            )
        else:
            outputs, features = module.apply(variables, images, train=False)
        return select(outputs, all_heads), features

    def apply_train(variables, images, all_heads=False):
        (outputs, features), updates = module.apply(
            variables, images, train=True, mutable=["batch_stats"]
        )
        stats = dict(updates).get("batch_stats", {})
        return (select(outputs, all_heads), features), stats

    def apply_head(head_vars, features, train=False, all_heads=False):
        if train:
            outputs, updates = module.head.apply(
                head_vars, features, train=True, mutable=["batch_stats"]
            )
            stats = dict(updates).get("batch_stats", {})
            return select(outputs, all_heads), stats
        return select(module.head.apply(head_vars, features, train=False), all_heads)

    return Model(
        init, apply, apply_train, apply_head, name, input_shape, num_classes, heads
    )
