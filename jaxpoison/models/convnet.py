"""A small CIFAR ConvNet: the from-scratch victim a 2-core CPU can train many times.

Three stages of conv 3x3 (no bias) - BatchNorm - ReLU - max-pool 2x2, with 16, 32
and 64 channels, then global average pooling to 64-d features and a linear head
(25k parameters). It stands in for ResNet-18 in the gradient-matching experiment's
CPU-sized runs: measured on the shared 2-core CPU (one jitted SGD step, batch 128),
it trains ~1,200 images/s against ~110 for ResNet-20 in the same run (ResNet-18
does ~13x ResNet-20's arithmetic per image); see configs/gradient_matching.py.
Inputs are normalised with the CIFAR-10 statistics, as forest's models are.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from jaxpoison.models.alexnet import CIFAR_MEAN, CIFAR_STD
from jaxpoison.models.base import Classifier, LinearHead, Model, from_flax
from jaxpoison.models.conv import conv_general_dilated

# Convolutions whose gradients stay fast inside lax.scan on CPU (models/conv.py).
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
# PyTorch BatchNorm defaults: eps 1e-5, running = 0.9 running + 0.1 batch.
BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)


class ConvNetBackbone(nn.Module):
    """conv-BN-ReLU-pool stages of `widths` channels, then global average pooling."""

    widths: tuple[int, ...] = (16, 32, 64)

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i, width in enumerate(self.widths):
            x = Conv(
                width, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name=f"conv{i}"
            )(x)
            x = BatchNorm(use_running_average=not train, name=f"bn{i}")(x)
            x = nn.max_pool(nn.relu(x), (2, 2), (2, 2))
        return jnp.mean(x, axis=(1, 2))


def convnet_small(num_classes: int = 10) -> Model:
    """The 16-32-64 ConvNet for 32x32 images; features are the 64-d pooled layer."""
    module = Classifier(
        backbone=ConvNetBackbone(),
        head=LinearHead(num_classes, "linear"),
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
    )
    return from_flax("convnet_small", module, (32, 32, 3), num_classes)
