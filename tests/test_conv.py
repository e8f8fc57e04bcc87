"""Canonical-gradient convolutions equal JAX's own, values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxpoison.models.conv import conv_general_dilated, stock_convolutions

CASES = [  # (input size, kernel, strides, padding)
    (9, 3, (1, 1), ((1, 1), (1, 1))),
    (8, 3, (2, 2), ((1, 1), (1, 1))),
    (9, 3, (2, 2), "SAME"),
    (10, 7, (2, 2), ((3, 3), (3, 3))),
    (8, 1, (2, 2), "VALID"),
    (8, 5, (1, 1), "SAME"),
]


def _grads(conv, x, w, strides, padding):
    def loss(x, w):
        y = conv(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jnp.sin(y))

    return jax.value_and_grad(loss, argnums=(0, 1))(x, w)


@pytest.mark.parametrize("size, k, strides, padding", CASES)
def test_gradients_equal_lax(size, k, strides, padding):
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(2, size, size, 3)))
        w = jnp.asarray(rng.normal(size=(k, k, 3, 4)))
        ours = _grads(conv_general_dilated, x, w, strides, padding)
        ref = _grads(lax.conv_general_dilated, x, w, strides, padding)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), ours, ref)


def test_gradients_equal_lax_under_vmap_over_kernels():
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(3, 2, 8, 8, 3)))
        w = jnp.asarray(rng.normal(size=(3, 3, 3, 3, 4)))
        pad = ((1, 1), (1, 1))
        ours = jax.vmap(lambda a, b: _grads(conv_general_dilated, a, b, (2, 2), pad))(
            x, w
        )
        ref = jax.vmap(
            lambda a, b: _grads(lax.conv_general_dilated, a, b, (2, 2), pad)
        )(x, w)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), ours, ref)


def test_stock_convolutions_bypass_the_custom_gradient():
    x, w = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2))
    args = ((1, 1), ((1, 1), (1, 1)))
    dims = {"dimension_numbers": ("NHWC", "HWIO", "NHWC")}
    with stock_convolutions():
        stock = jax.make_jaxpr(lambda w: conv_general_dilated(x, w, *args, **dims))(w)
    custom = jax.make_jaxpr(lambda w: conv_general_dilated(x, w, *args, **dims))(w)
    assert "custom_vjp" not in str(stock) and "custom_vjp" in str(custom)
