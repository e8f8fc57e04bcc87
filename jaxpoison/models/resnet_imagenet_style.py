"""ResNet-18 (CIFAR variant) and the two-head ResNet-34 of the road-sign studies.

Both use projection (option B) shortcuts: a strided 1x1 conv + BatchNorm.
ResNet-18 follows the CIFAR adaptation used by the poisoning benchmark (3x3 stem,
no max-pool, 4x4 average pool to 512-d features). The road-sign model is an
ImageNet-style ResNet-34 (7x7/2 stem and max-pool) with two heads on the pooled
512-d features, each BatchNorm + Linear: a 4-way classifier and a 4-number box
regressor. Its logits are the classifier's; with `all_heads=True` (the trainer's box
loss) it returns `{"class": logits, "box": boxes}` (models/base.py).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from jaxpoison.models.alexnet import CIFAR_MEAN, CIFAR_STD
from jaxpoison.models.base import Classifier, LinearHead, Model, from_flax
from jaxpoison.models.conv import conv_general_dilated
from jaxpoison.models.resnet_cifar import IMAGENET_MEAN, IMAGENET_STD

# Convolutions whose gradients stay fast inside lax.scan on CPU (models/conv.py).
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)


class ProjectionBlock(nn.Module):
    features: int
    stride: int

    @nn.compact
    def __call__(self, x, train: bool):
        norm = functools.partial(BatchNorm, use_running_average=not train)
        s = (self.stride, self.stride)
        y = Conv(
            self.features,
            (3, 3),
            s,
            padding=((1, 1), (1, 1)),
            use_bias=False,
            name="conv1",
        )(x)
        y = nn.relu(norm(name="bn1")(y))
        y = Conv(
            self.features,
            (3, 3),
            padding=((1, 1), (1, 1)),
            use_bias=False,
            name="conv2",
        )(y)
        y = norm(name="bn2")(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = Conv(self.features, (1, 1), s, use_bias=False, name="shortcut_0")(x)
            x = norm(name="shortcut_1")(x)
        return nn.relu(y + x)


class ResNetBackbone(nn.Module):
    """Stages of `ProjectionBlock`s (64/128/256/512) and global average pooling."""

    stage_sizes: tuple[int, ...]
    imagenet_stem: bool

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = functools.partial(BatchNorm, use_running_average=not train)
        if self.imagenet_stem:
            x = Conv(
                64,
                (7, 7),
                (2, 2),
                padding=((3, 3), (3, 3)),
                use_bias=False,
                name="conv1",
            )(x)
            x = nn.relu(norm(name="bn1")(x))
            x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        else:
            x = Conv(
                64, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name="conv1"
            )(x)
            x = nn.relu(norm(name="bn1")(x))
        for stage, blocks in enumerate(self.stage_sizes):
            for b in range(blocks):
                stride = 2 if stage > 0 and b == 0 else 1
                x = ProjectionBlock(
                    64 * 2**stage, stride, name=f"layer{stage + 1}_{b}"
                )(x, train)
        return jnp.mean(x, axis=(1, 2))


class ClassAndBoxHeads(nn.Module):
    """Two heads on the pooled features, each BatchNorm + Linear."""

    num_classes: int

    @nn.compact
    def __call__(self, features, train: bool = False):
        norm = functools.partial(BatchNorm, use_running_average=not train)
        logits = nn.Dense(self.num_classes, name="class_fc")(
            norm(name="class_bn")(features)
        )
        boxes = nn.Dense(4, name="box_fc")(norm(name="box_bn")(features))
        return {"class": logits, "box": boxes}


def resnet18_cifar(num_classes: int = 10) -> Model:
    module = Classifier(
        ResNetBackbone((2, 2, 2, 2), imagenet_stem=False),
        LinearHead(num_classes, "linear"),
        CIFAR_MEAN,
        CIFAR_STD,
    )
    return from_flax("resnet18", module, (32, 32, 3), num_classes)


def roadsign_resnet34(num_classes: int = 4, image_size: int = 64) -> Model:
    module = Classifier(
        ResNetBackbone((3, 4, 6, 3), imagenet_stem=True),
        ClassAndBoxHeads(num_classes),
        IMAGENET_MEAN,
        IMAGENET_STD,
    )
    return from_flax(
        "roadsign_resnet34",
        module,
        (image_size, image_size, 3),
        num_classes,
        heads=("class", "box"),
    )
