"""Canonical-gradient convolutions equal JAX's own, values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxpoison.models.conv import (
    YNN_GROUP_CHANNELS,
    YNN_MIN_CHANNELS,
    conv_general_dilated,
    narrow_convolutions,
    stock_convolutions,
)

CASES = [  # (input size, kernel, strides, padding)
    (9, 3, (1, 1), ((1, 1), (1, 1))),
    (8, 3, (2, 2), ((1, 1), (1, 1))),
    (9, 3, (2, 2), "SAME"),
    (10, 7, (2, 2), ((3, 3), (3, 3))),
    (8, 1, (2, 2), "VALID"),
    (8, 5, (1, 1), "SAME"),
    (10, 4, (1, 1), "SAME"),  # asymmetric padding (1, 2)
    (6, 3, (1, 1), ((3, 3), (3, 3))),  # padding wider than the kernel
]


def _grads(conv, x, w, strides, padding):
    def loss(x, w):
        y = conv(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jnp.sin(y))

    return jax.value_and_grad(loss, argnums=(0, 1))(x, w)


# 3 input channels take the patches path (an RGB stem), 6 (x 4 outputs) the canonical
# convolution reshaped for YNNPACK (column groups at stride 1, else widened to
# YNN_MIN_CHANNELS outputs), 24 the canonical convolution as is.
PATHS = [3, 6, 24]


@pytest.mark.parametrize("channels", PATHS)
@pytest.mark.parametrize("size, k, strides, padding", CASES)
def test_gradients_equal_lax(size, k, strides, padding, channels):
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(2, size, size, channels)))
        w = jnp.asarray(rng.normal(size=(k, k, channels, 4)))
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
    x, w = jnp.ones((1, 4, 4, 8)), jnp.ones((3, 3, 8, 2))  # 8 channels: no patches
    args = ((1, 1), ((1, 1), (1, 1)))
    dims = {"dimension_numbers": ("NHWC", "HWIO", "NHWC")}
    with stock_convolutions():
        stock = jax.make_jaxpr(lambda w: conv_general_dilated(x, w, *args, **dims))(w)
    custom = jax.make_jaxpr(lambda w: conv_general_dilated(x, w, *args, **dims))(w)
    assert "custom_vjp" not in str(stock) and "custom_vjp" in str(custom)


@pytest.mark.parametrize("strides", [(1, 1), (2, 2)])
@pytest.mark.parametrize("channels", PATHS)
def test_second_order_gradients_equal_lax(channels, strides):
    """grad of (input gradient . v) w.r.t. the kernel, as MetaPoison differentiates
    through training steps: both paths equal stock lax convolutions."""
    rng = np.random.default_rng(2)
    pad = ((1, 1), (1, 1))
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(2, 8, 8, channels)))
        w = jnp.asarray(rng.normal(size=(3, 3, channels, 4)))
        v = jnp.asarray(rng.normal(size=x.shape))

        def outer(conv):
            def inner(w):
                dx = jax.grad(lambda x: _grads(conv, x, w, strides, pad)[0])(x)
                return jnp.vdot(dx, v)

            return jax.grad(inner)(w)

        ours, ref = outer(conv_general_dilated), outer(lax.conv_general_dilated)
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-12)


def test_rgb_stems_run_as_patches():
    """Input channels <= PATCH_CHANNELS become one matmul, no convolution op."""
    x, w = jnp.ones((1, 8, 8, 3)), jnp.ones((3, 3, 3, 2))
    dims = ("NHWC", "HWIO", "NHWC")
    hlo = (
        jax.jit(
            lambda x: conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dims)
        )
        .lower(x)
        .as_text()
    )
    assert "convolution" not in hlo and "dot_general" in hlo


def _conv_output_channels(x, w, strides=(1, 1)):
    """Output feature counts of the convolutions in the optimised forward+backward."""

    def loss(x):
        y = conv_general_dilated(
            x, w, strides, "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jnp.sum(y**2)

    hlo = jax.jit(jax.grad(loss)).lower(x).compile().as_text()
    lines = [line for line in hlo.splitlines() if "convolution(" in line]
    return sorted({int(line.split("]")[0].split(",")[-1]) for line in lines})


def test_stride_one_narrow_convolutions_compute_column_groups():
    """16 -> 16: forward and input gradient both compute 2 columns x 16 channels."""
    x, w = jnp.ones((2, 8, 8, 16)), jnp.ones((3, 3, 16, 16))
    assert _conv_output_channels(x, w) == [YNN_GROUP_CHANNELS]


def test_strided_narrow_convolutions_are_widened_and_their_input_gradients_kept():
    """A stride-2 conv's input gradient dilates its input: YNNPACK never takes it."""
    x, w = jnp.ones((2, 8, 8, 8)), jnp.ones((3, 3, 8, 8))
    assert _conv_output_channels(x, w, (2, 2)) == [8, YNN_MIN_CHANNELS]


def test_odd_input_channels_stay_narrow():
    """5 -> 8 forward stays (YNNPACK is slow at odd inputs); its input gradient,
    8 -> 5, computes 32 // 5 = 6 column groups of 5."""
    x, w = jnp.ones((2, 8, 8, 5)), jnp.ones((3, 3, 5, 8))
    assert _conv_output_channels(x, w) == [8, 30]


def test_narrow_convolutions_context_keeps_them_as_they_are():
    x, w = jnp.ones((2, 8, 8, 16)), jnp.ones((3, 3, 16, 16))
    with narrow_convolutions():
        assert _conv_output_channels(x, w) == [16]
