"""CIFAR ResNet-20/32/44/56 (He et al. 2016, Sec. 4.2) with option-A shortcuts.

Layer names follow PyTorch's akamaster/pytorch_resnet_cifar10 state dicts
(`layer2.0.conv1.weight` -> params/backbone/layer2_0/conv1/kernel) so that its
published checkpoints load one to one (see `load_torch_state_dict`).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from jaxpoison.models.base import Classifier, LinearHead, Model, from_flax
from jaxpoison.models.conv import conv_general_dilated

# akamaster normalises with the ImageNet statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9}

# PyTorch BatchNorm defaults: eps 1e-5, running = 0.9 running + 0.1 batch.
# Convolutions whose gradients stay fast inside lax.scan on CPU (models/conv.py).
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)


def conv3x3(features: int, stride: int, name: str) -> nn.Conv:
    # Explicit symmetric padding: "SAME" pads (0, 1) at stride 2, PyTorch pads (1, 1).
    return Conv(
        features,
        (3, 3),
        (stride, stride),
        padding=((1, 1), (1, 1)),
        use_bias=False,
        name=name,
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs; option A shortcut: subsample and zero-pad the channels."""

    features: int
    stride: int

    @nn.compact
    def __call__(self, x, train: bool):
        y = conv3x3(self.features, self.stride, "conv1")(x)
        y = nn.relu(BatchNorm(use_running_average=not train, name="bn1")(y))
        y = conv3x3(self.features, 1, "conv2")(y)
        y = BatchNorm(use_running_average=not train, name="bn2")(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            pad = self.features // 4
            x = jnp.pad(x[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (pad, pad)))
        return nn.relu(y + x)


class ResNetCifarBackbone(nn.Module):
    """3x3 conv 16, three stages of `blocks` blocks (16/32/64), global avg pool."""

    blocks: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = conv3x3(16, 1, "conv1")(x)
        x = nn.relu(BatchNorm(use_running_average=not train, name="bn1")(x))
        for stage, features in enumerate((16, 32, 64)):
            for b in range(self.blocks):
                stride = 2 if stage > 0 and b == 0 else 1
                x = BasicBlock(features, stride, name=f"layer{stage + 1}_{b}")(x, train)
        return jnp.mean(x, axis=(1, 2))


def resnet_cifar(name: str, num_classes: int = 10) -> Model:
    """ResNet-20/32/44/56 for 32x32 inputs; features are the 64-d pooled layer."""
    module = Classifier(
        backbone=ResNetCifarBackbone(DEPTHS[name]),
        head=LinearHead(num_classes, "linear"),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
    return from_flax(name, module, (32, 32, 3), num_classes)
