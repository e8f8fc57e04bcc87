"""The scaled-down AlexNet of Poison Frogs (Shafahi et al. 2018, Table 1).

conv 5x5x64 - max-pool 3/2 - LRN - conv 5x5x64 - max-pool 3/2 - LRN - fc 384 -
fc 192 - fc 10, the TensorFlow CIFAR-10 tutorial network the paper's end-to-end
experiments attack. Features are the 192-d layer.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpoison.models.base import Classifier, LinearHead, Model, from_flax
from jaxpoison.models.conv import conv_general_dilated

# Convolutions whose gradients stay fast inside lax.scan on CPU (models/conv.py).
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def local_response_norm(
    x: jax.Array,
    depth_radius: int = 4,
    bias: float = 1.0,
    alpha: float = 0.001 / 9.0,
    beta: float = 0.75,
) -> jax.Array:
    """`tf.nn.local_response_normalization` over the channel axis (NHWC).

    out = x / (bias + alpha * sum_{|c'-c| <= r} x_{c'}^2) ** beta, with the TF
    tutorial's constants as defaults.
    """
    squared = jnp.square(x)
    window = (1, 1, 1, 2 * depth_radius + 1)
    pad = ((0, 0), (0, 0), (0, 0), (depth_radius, depth_radius))
    sums = jax.lax.reduce_window(squared, 0.0, jax.lax.add, window, (1,) * 4, pad)
    return x / (bias + alpha * sums) ** beta


class AlexNetBackbone(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        for i in (1, 2):
            x = nn.relu(Conv(64, (5, 5), padding="SAME", name=f"conv{i}")(x))
            x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
            x = local_response_norm(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(384, name="fc1")(x))
        return nn.relu(nn.Dense(192, name="fc2")(x))


def alexnet_frogs(num_classes: int = 10) -> Model:
    module = Classifier(
        AlexNetBackbone(), LinearHead(num_classes, "fc3"), CIFAR_MEAN, CIFAR_STD
    )
    return from_flax("alexnet_frogs", module, (32, 32, 3), num_classes)
