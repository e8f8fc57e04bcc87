"""Models as `Model(init, apply, ...)` pairs of pure functions, and their weights."""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxpoison.errors import UserInputError
from jaxpoison.models.alexnet import alexnet_frogs
from jaxpoison.models.base import (
    Model,
    Variables,
    class_logits,
    head_variables,
    with_head,
)
from jaxpoison.models.convnet import convnet_small
from jaxpoison.models.resnet_cifar import DEPTHS, resnet_cifar
from jaxpoison.models.resnet_imagenet_style import resnet18_cifar, roadsign_resnet34
from jaxpoison.models.roadsign_cifar import (
    NAMES as ROADSIGN_CIFAR_NAMES,
)
from jaxpoison.models.roadsign_cifar import (
    backbone_source,
    graft_backbone,
    roadsign_cifar,
)
from jaxpoison.models.torch_weights import load_torch_state_dict
from jaxpoison.paths import shared_data_dir

_REGISTRY: dict[str, Callable[..., Model]] = {
    **{name: functools.partial(resnet_cifar, name) for name in DEPTHS},
    "alexnet_frogs": alexnet_frogs,
    "convnet_small": convnet_small,
    "resnet18": resnet18_cifar,
    "roadsign_resnet34": roadsign_resnet34,
    **{name: functools.partial(roadsign_cifar, name) for name in ROADSIGN_CIFAR_NAMES},
}
MODEL_NAMES = tuple(sorted(_REGISTRY))


def get_model(name: str, **kwargs) -> Model:
    """The model registered as `name` (see `MODEL_NAMES`)."""
    if name not in _REGISTRY:
        raise UserInputError(
            f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}"
        )
    return _REGISTRY[name](**kwargs)


def sized_model(name: str, num_classes: int, image_size: int) -> Model:
    """`get_model` for square `image_size`-px images: an architecture built for one
    input size (the two-head `roadsign_resnet34`) is built for this one; the
    others pool globally and take any size as they are."""
    build = _REGISTRY.get(name)
    takes_size = (
        build is not None and "image_size" in inspect.signature(build).parameters
    )
    kwargs = {"image_size": image_size} if takes_size else {}
    return get_model(name, num_classes=num_classes, **kwargs)


def load_pretrained(name: str, path: str, **kwargs) -> tuple[Model, Variables]:
    """A registered model and its weights from a PyTorch state dict saved as .npz.

    Raises:
      UserInputError: unknown name, missing file, or weights that do not fit.
    """
    model = get_model(name, **kwargs)
    template = jax.eval_shape(model.init, jax.random.key(0))
    try:
        variables = load_torch_state_dict(path, template)
    except UserInputError as e:
        raise UserInputError(f"{name}: {e}") from None
    return model, variables


def shipped_weights(name: str = "resnet20") -> str:
    """Path of pretrained weights shipped inside the package (BSD-2-Clause)."""
    if name not in _REGISTRY:
        raise UserInputError(
            f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}"
        )
    path = os.path.join(
        os.path.dirname(__file__), "..", "assets", f"{name}_cifar10.npz"
    )
    if not os.path.isfile(path):
        raise UserInputError(f"no shipped weights for {name!r} (only resnet20)")
    return os.path.normpath(path)


# ../shared/data/weights beside the checkout: the CIFAR checkpoints of the other
# ResNets (resnet32/44/56/110). Resolved when a run starts, so that a workdir's
# recorded config does not hold one checkout's path.
WEIGHTS_DIR_ENV = "JAXPOISON_WEIGHTS_DIR"


def default_weights_dir() -> str:
    """`$JAXPOISON_WEIGHTS_DIR`, else ../shared/data/weights beside the checkout."""
    return shared_data_dir("weights", WEIGHTS_DIR_ENV)


def cifar10_weights(name: str, weights_dir: str = "") -> str:
    """The CIFAR-10 checkpoint of model `name`: the package's (ResNet-20), else
    `weights_dir/<name>_cifar10.npz` (empty: `default_weights_dir()`)."""
    try:
        return shipped_weights(name)
    except UserInputError:
        directory = weights_dir or default_weights_dir()
        return os.path.join(directory, f"{name}_cifar10.npz")


def initial_model(
    name: str,
    num_classes: int,
    key,
    init: str = "pretrained",
    weights: str | None = None,
):
    """Model `name` with `num_classes` outputs and the variables a victim starts
    from: `init` "scratch" is `model.init(key)`; "pretrained" the weights at
    `weights` (default: those shipped), for another number of classes their
    extractor with the fresh head of `key`."""
    model = get_model(name, num_classes=num_classes)
    fresh = model.init(key)
    if init == "scratch":
        return model, fresh
    if init != "pretrained":
        raise UserInputError(f"init must be 'pretrained' or 'scratch', not {init!r}")
    shipped, variables = load_pretrained(name, weights or shipped_weights(name))
    if num_classes == shipped.num_classes:
        return model, variables
    return model, with_head(variables, head_variables(fresh))


def pretrained_backbone(name: str, path: str = "") -> Variables:
    """The pretrained backbone for the two-head road-sign model `name`
    (`roadsign_resnetNN`): the variables of CIFAR ResNet-NN loaded from `path`
    (a PyTorch state dict as .npz; empty: `cifar10_weights` of ResNet-NN), to
    `graft_backbone` onto fresh heads.

    Raises:
      UserInputError: a model without a CIFAR backbone, or weights that do not fit.
    """
    source = backbone_source(name)
    return load_pretrained(source, path or cifar10_weights(source))[1]


def task_model(name: str, variables: Variables, num_classes: int):
    """Model `name` with `num_classes` outputs and variables that keep the pretrained
    extractor of `variables` (the head is zeros: victims start theirs cold)."""
    model = get_model(name, num_classes=num_classes)
    fresh = head_variables(jax.eval_shape(model.init, jax.random.key(0)))
    fresh = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), fresh)
    return model, with_head(variables, fresh)


__all__ = [
    "MODEL_NAMES",
    "Model",
    "Variables",
    "WEIGHTS_DIR_ENV",
    "cifar10_weights",
    "class_logits",
    "get_model",
    "graft_backbone",
    "default_weights_dir",
    "head_variables",
    "initial_model",
    "load_pretrained",
    "pretrained_backbone",
    "shipped_weights",
    "sized_model",
    "task_model",
    "with_head",
]
