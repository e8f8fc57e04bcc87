"""Two-head road-sign models on a pretrained CIFAR-10 ResNet backbone.

The road-sign studies fine-tune an ImageNet-pretrained ResNet-34 with two heads (a
4-way classifier and a 4-number box regressor, each BatchNorm + Linear on the pooled
features). No ImageNet weights exist offline here, so `roadsign_resnet{20,32,44,56}`
put the same two heads (`ClassAndBoxHeads`) on a CIFAR ResNet backbone
(`ResNetCifarBackbone`, 64-d pooled features) whose weights come from the CIFAR-10
checkpoints in ../shared/data/weights (`pretrained_backbone`). ResNet-32 has the
depth closest to ResNet-34; ResNet-20 is the cheapest.
"""

from __future__ import annotations

import jax

from jaxpoison.errors import UserInputError
from jaxpoison.models.base import Classifier, Model, Variables, from_flax
from jaxpoison.models.resnet_cifar import (
    DEPTHS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ResNetCifarBackbone,
)
from jaxpoison.models.resnet_imagenet_style import ClassAndBoxHeads

PREFIX = "roadsign_"
NAMES = tuple(PREFIX + name for name in DEPTHS)


def roadsign_cifar(name: str, num_classes: int = 4) -> Model:
    """`roadsign_resnetNN`: the CIFAR ResNet-NN backbone with class and box heads.

    Input 32 x 32 by construction (the backbone pools globally, so other sizes run).
    """
    if name not in NAMES:
        raise UserInputError(f"unknown road-sign model {name!r}: {', '.join(NAMES)}")
    module = Classifier(
        ResNetCifarBackbone(DEPTHS[name.removeprefix(PREFIX)]),
        ClassAndBoxHeads(num_classes),
        IMAGENET_MEAN,
        IMAGENET_STD,
    )
    return from_flax(name, module, (32, 32, 3), num_classes, heads=("class", "box"))


def backbone_source(name: str) -> str:
    """The CIFAR model whose checkpoint holds `name`'s backbone (e.g. resnet20)."""
    if name not in NAMES:
        raise UserInputError(
            f"model {name!r} has no pretrained CIFAR backbone: {', '.join(NAMES)}"
        )
    return name.removeprefix(PREFIX)


def graft_backbone(variables: Variables, source: Variables) -> Variables:
    """`variables` with every collection's "backbone" replaced by `source`'s.

    The heads stay as they are (a fresh initialisation: the victim starts them
    cold). Works under `vmap` with `source` shared (unbatched).
    """
    out = {col: dict(tree) for col, tree in variables.items()}
    for col, tree in source.items():
        if "backbone" in tree:
            out[col]["backbone"] = jax.tree.map(lambda x: x, tree["backbone"])
    return out
