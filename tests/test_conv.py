"""Canonical-gradient convolutions equal JAX's own, values and gradients."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxpoison.models import conv
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
    (2, 3, (1, 1), ((1, 1), (1, 1))),  # kernel larger than the input: im2col GEMM
    (1, 3, (1, 1), ((1, 1), (1, 1))),
    (2, 3, (2, 2), ((1, 1), (1, 1))),
]


def _grads(conv, x, w, strides, padding):
    def loss(x, w):
        y = conv(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jnp.sin(y))

    return jax.value_and_grad(loss, argnums=(0, 1))(x, w)


# Narrow convolutions (x 4 outputs) are reshaped for YNNPACK: column groups at stride
# 1, else widened to YNN_MIN_CHANNELS outputs; 3 input channels (an RGB stem) also get
# a zero channel. 24 input channels: the canonical convolution as is.
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
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12), ours, ref
    )


@pytest.mark.parametrize("strides", [(1, 1), (2, 2)])
def test_weight_gradient_summed_over_image_blocks_equals_lax(monkeypatch, strides):
    """A batch larger than one block of `WGRAD_BLOCK_BYTES` runs the weight gradient
    as a loop over blocks (one image each here), summed: still JAX's own value."""
    monkeypatch.setattr(conv, "WGRAD_BLOCK_BYTES", 1)
    assert conv.image_block(4, 1) == 1
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(4, 8, 8, 24)))
        w = jnp.asarray(rng.normal(size=(3, 3, 24, 20)))
        ours = _grads(conv_general_dilated, x, w, strides, "SAME")
        ref = _grads(lax.conv_general_dilated, x, w, strides, "SAME")
    np.testing.assert_allclose(ours[1][1], ref[1][1], rtol=1e-12, atol=1e-12)


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
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12), ours, ref
    )


def test_stock_convolutions_bypass_the_custom_gradient():
    x, w = jnp.ones((1, 4, 4, 8)), jnp.ones((3, 3, 8, 2))
    args = ((1, 1), ((1, 1), (1, 1)))
    dims = {"dimension_numbers": ("NHWC", "HWIO", "NHWC")}
    with stock_convolutions():
        stock = jax.make_jaxpr(lambda w: conv_general_dilated(x, w, *args, **dims))(w)
    custom = jax.make_jaxpr(lambda w: conv_general_dilated(x, w, *args, **dims))(w)
    assert "custom_vjp" not in str(stock) and "custom_vjp" in str(custom)


def test_stock_environment_variable_bypasses_the_custom_gradient_for_a_run():
    code = (
        "import jax, jax.numpy as jnp; from jaxpoison.models import conv; "
        "f = lambda w: conv.conv_general_dilated(jnp.ones((1, 4, 4, 8)), w, (1, 1), "
        "((1, 1), (1, 1)), dimension_numbers=conv.CANONICAL); "
        "print('custom_vjp' in str(jax.make_jaxpr(f)(jnp.ones((3, 3, 8, 2)))))"
    )
    env = {**os.environ, "JAXPOISON_STOCK_CONVOLUTIONS": "1", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True
    )
    assert out.stdout.strip() == "False", out.stderr


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


@pytest.mark.parametrize(
    "channels, strides", [(16, (1, 1)), (3, (1, 1)), (24, (2, 2)), (8, (2, 2))]
)
def test_second_order_gradients_have_no_input_dilated_convolutions(channels, strides):
    """A metagradient differentiates the forward conv of a training step too: its
    transpose must come from the custom VJP (canonical convs, GEMMs), not from JAX's
    rule for the column-grouped or strided conv, an input-dilated convolution that
    XLA:CPU runs in its slow fallback."""
    x, w = jnp.ones((2, 8, 8, channels)), jnp.ones((3, 3, channels, 4))

    def conv(x, w):
        dims = ("NHWC", "HWIO", "NHWC")
        return conv_general_dilated(x, w, strides, "SAME", dimension_numbers=dims)

    def step_loss(x):  # the gradient of a nonlinear loss w.r.t. the kernel, at x
        dw = jax.grad(lambda w: jnp.sum(jnp.sin(conv(x, w))))(w)
        return jnp.sum(conv(x, w - dw) ** 2)

    text = jax.jit(jax.grad(step_loss)).lower(x).as_text()
    dilations = re.findall(r"lhs_dilate = \[(\d+), (\d+)\]", text)
    assert len(dilations) >= 3
    assert set(dilations) == {("1", "1")}


def _conv_channels(x, w, strides=(1, 1)):
    """(input, output) feature counts of each convolution in forward + backward."""

    def loss(x):
        y = conv_general_dilated(
            x, w, strides, "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jnp.sum(y**2)

    text = jax.jit(jax.grad(loss)).lower(x).as_text()
    signatures = re.findall(
        r"stablehlo.convolution.*: \(tensor<(\S+)xf32>, .*-> tensor<(\S+)xf32>", text
    )
    return sorted((int(a.split("x")[-1]), int(b.split("x")[-1])) for a, b in signatures)


def test_stride_one_narrow_convolutions_compute_column_groups():
    """16 -> 16: forward and input gradient both compute 2 columns x 16 channels."""
    x, w = jnp.ones((2, 8, 8, 16)), jnp.ones((3, 3, 16, 16))
    assert _conv_channels(x, w) == [(16, YNN_GROUP_CHANNELS)] * 2


def test_strided_narrow_convolutions_are_widened_and_input_gradients_are_gemms():
    """A stride-2 conv's input gradient as a conv would dilate its input (YNNPACK
    never takes it): it is a GEMM and col2im instead, so only the forward is a conv."""
    x, w = jnp.ones((2, 8, 8, 8)), jnp.ones((3, 3, 8, 8))
    assert _conv_channels(x, w, (2, 2)) == [(8, YNN_MIN_CHANNELS)]


def test_odd_input_channels_get_a_zero_channel():
    """5 -> 8 runs as 6 -> 4 columns x 8; its input gradient, 8 -> 5, as 4 x 8."""
    x, w = jnp.ones((2, 8, 8, 5)), jnp.ones((3, 3, 5, 8))
    assert _conv_channels(x, w) == [(6, 32), (8, 32)]


def test_narrow_convolutions_context_keeps_them_as_they_are():
    x, w = jnp.ones((2, 8, 8, 16)), jnp.ones((3, 3, 16, 16))
    with narrow_convolutions():
        assert _conv_channels(x, w) == [(16, 16)] * 2
