"""A 2-D convolution whose gradients XLA:CPU runs fast inside loops.

Why: reverse-mode autodiff of an NHWC/HWIO convolution emits convolutions with
non-canonical dimension numbers (the input gradient reads the kernel as `01oi`, the
weight gradient puts the batch in the feature slot). XLA:CPU's ConvCanonicalization
pass rewrites those into transposes plus a canonical convolution, but only in the
entry computation (openxla/xla `xla/service/cpu/conv_canonicalization.cc`). Inside a
while-loop body (`lax.scan`, `fori_loop`, `lax.map`) they stay non-canonical, miss
the Eigen/YNNPACK kernels and fall back to XLA's naive elemental convolution
("Falling back to unoptimized convolution", `xla/service/cpu/thunk_emitter.cc`); the
same mechanism as jax-ml/jax#12868. On this 2-core CPU that made a ResNet-20 crafting
step ~10x and a training step ~30x slower under `lax.scan`
(benchmarks/scan_vs_host.py).

`canonical_conv` has a custom VJP that writes both gradients as canonical
convolutions with explicit transposes, so a scanned step runs as fast as a top-level
one. Every model passes `conv_general_dilated` below to `flax.linen.Conv`.

On CPU, narrow convolutions (at most 16 input and output channels: an RGB stem,
ResNet-20's first stage) miss YNNPACK, XLA:CPU's fast kernels
(`IsConvolutionOpSupportedByYnn` in openxla/xla `xla/backends/cpu/ynn_support.cc`
refuses them), and run in XLA's slower fallback. `ynn_conv` reshapes them, same
arithmetic, so that YNNPACK takes them: a stride-1 conv computes several adjacent
output columns per position as channels (`column_grouped_conv`), others get zero
output channels, odd input counts a zero input channel
(`python benchmarks/narrow_conv.py`).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os

import jax
import jax.numpy as jnp
from jax import lax

CANONICAL = ("NHWC", "HWIO", "NHWC")
# Set while tracing inside `stock_convolutions()`; JAXPOISON_STOCK_CONVOLUTIONS=1 sets
# it for a whole run (README's speed section times experiments both ways).
_STOCK = [os.environ.get("JAXPOISON_STOCK_CONVOLUTIONS", "0") == "1"]


@contextlib.contextmanager
def stock_convolutions():
    """Trace models with JAX's own convolution gradients (benchmarks compare both)."""
    _STOCK.append(True)
    try:
        yield
    finally:
        _STOCK.pop()


def _conv(x, w, strides, padding, dimension_numbers=CANONICAL):
    return lax.conv_general_dilated(
        x, w, strides, padding, dimension_numbers=dimension_numbers
    )


# XLA:CPU hands a convolution to YNNPACK only if it has more than 16 input or output
# channels (`ynn_support.cc`). For narrower ones YNNPACK is faster than the fallback
# given an even number of input channels (or one); odd counts >= 3 get a zero input
# channel first (`python benchmarks/narrow_conv.py`).
YNN_MIN_CHANNELS = 17
# A stride-1 narrow conv computes YNN_GROUP_CHANNELS outputs per position: adjacent
# output columns as channels, its output channels padded to a power of two (16 -> 2
# columns x 16, 3 -> 8 x 4): the fastest group sizes in scratch timings for 3-16 in
# and out channels, where output counts that are not a multiple of 8 ran up to 2x
# slower (30 against 32); faster than zero-padding the outputs to 17 (`python
# benchmarks/narrow_conv.py --widen` compares).
YNN_GROUP_CHANNELS = 32
_ROUTE = [True]  # cleared inside `narrow_convolutions()`


@contextlib.contextmanager
def narrow_convolutions():
    """Trace narrow convolutions as they are (benchmarks compare both)."""
    _ROUTE.append(False)
    try:
        yield
    finally:
        _ROUTE.pop()


def routed_to_ynn(in_channels: int, out_channels: int) -> bool:
    """Whether a convolution is reshaped so that XLA:CPU runs it with YNNPACK."""
    narrow = max(in_channels, out_channels) < YNN_MIN_CHANNELS
    return _ROUTE[-1] and narrow and jax.default_backend() == "cpu"


def lanes(out_channels: int) -> int:
    """Output channels padded to a power of two, for `column_grouped_conv`."""
    return 1 << (out_channels - 1).bit_length()


def column_group(out_channels: int, out_width: int) -> int:
    """Adjacent output columns a stride-1 narrow conv computes per position."""
    return max(1, min(YNN_GROUP_CHANNELS // lanes(out_channels), out_width))


def ynn_conv(x, w, strides, padding):
    """`_conv`, reshaped onto YNNPACK when narrow (`routed_to_ynn`); same result.

    An odd input count >= 3 (an RGB stem) gets a zero input channel. Then, at
    stride 1, `column_grouped_conv`; otherwise zero output channels up to
    `YNN_MIN_CHANNELS`, sliced off after.
    """
    cin, cout = w.shape[2], w.shape[3]
    if any(k > n for k, n in zip(w.shape[:2], x.shape[1:3], strict=True)):
        # YNNPACK refuses a kernel larger than its input (a 3x3 conv on the 2x2 and
        # 1x1 maps of ResNet-34's last stages at 32 px; an explicit pad is folded
        # back into the conv) and the fallback was ~100x slower: one im2col GEMM.
        cols = im2col(x, w.shape[:2], strides, padding)
        return cols @ w.reshape(-1, cout)
    if not routed_to_ynn(cin, cout):
        return _conv(x, w, strides, padding)
    if cin > 1 and cin % 2:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, 1)))
        w = jnp.pad(w, ((0, 0), (0, 0), (0, 1), (0, 0)))
    out_width = x.shape[2] + sum(padding[1]) - w.shape[1] + 1
    group = column_group(cout, out_width)
    if set(strides) == {1} and group > 1:
        return column_grouped_conv(x, w, padding, group)
    wide = jnp.pad(w, ((0, 0), (0, 0), (0, 0), (0, YNN_MIN_CHANNELS - cout)))
    return _conv(x, wide, strides, padding)[..., :cout]


def column_grouped_conv(x, w, padding, group: int):
    """A stride-1 conv computing `group` adjacent output columns per position.

    With w's outputs zero-padded to L = `lanes(cout)` and xp the padded input,
      y[n, i, g*j + p, o] = sum_{a,b,c} xp[n, i + a, g*j + p + b, c] w[a, b, c, o]
                          = sum_{a,b',c} xp[n, i + a, g*j + b', c] W[a, b', c, (p, o)]
    with W[a, b', c, (p, o)] = w[a, b' - p, c, o] (zero unless 0 <= b' - p < kw):
    one conv with window stride (1, g), kernel width kw + g - 1 and g * L outputs,
    which reshape (a bitcast) into g times as many columns of L channels.
    """
    kh, kw, cin, cout = w.shape
    w = jnp.pad(w, ((0, 0), (0, 0), (0, 0), (0, lanes(cout) - cout)))
    shifted = [
        jnp.pad(w, ((0, 0), (p, group - 1 - p), (0, 0), (0, 0))) for p in range(group)
    ]
    grouped = jnp.stack(shifted, axis=3).reshape(kh, kw + group - 1, cin, -1)
    (lo, hi) = padding[1]
    out_width = x.shape[2] + lo + hi - kw + 1
    groups = -(-out_width // group)
    # Right padding so that the last group's window fits.
    hi = group * groups + kw - 1 - x.shape[2] - lo
    y = _conv(x, grouped, (1, group), (padding[0], (lo, hi)))
    y = y.reshape(*y.shape[:2], groups * group, w.shape[3])
    return y[:, :, :out_width, :cout]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def canonical_conv(x, w, strides, padding):
    """NHWC x HWIO -> NHWC convolution whose gradients are canonical convolutions."""
    return ynn_conv(x, w, strides, padding)


def _fwd(x, w, strides, padding):
    # `canonical_conv` itself, not `ynn_conv`: a derivative of a training step's
    # gradient (a metagradient) differentiates this forward pass too, and must reach
    # `_bwd`'s canonical forms, not the transpose of the strided or column-grouped
    # conv (input-dilated convolutions, XLA:CPU's slow fallback).
    return canonical_conv(x, w, strides, padding), (x, w)


def input_grad(g, w, x_shape, strides, padding):
    """dL/dx of `canonical_conv(x, w)` given the output gradient g.

    Stride 1: the conv of g with the flipped, transposed kernel, padded k - 1 - pad,
    itself a `canonical_conv`, so that every derivative order stays canonical (and
    narrow ones reach YNNPACK). Strided: a GEMM and the transpose of `im2col`.
    """
    flipped_pads = tuple(
        (k - 1 - lo, k - 1 - hi)
        for k, (lo, hi) in zip(w.shape[:2], padding, strict=True)
    )
    if set(strides) == {1} and min(p for pair in flipped_pads for p in pair) >= 0:
        w_t = jnp.transpose(jnp.flip(w, (0, 1)), (0, 1, 3, 2))
        return canonical_conv(g, w_t, (1, 1), flipped_pads)
    # Strided: the transposed conv is an input-dilated one, which XLA:CPU runs in
    # its slow fallback; instead a GEMM to patch gradients, then the transpose of
    # im2col (each patch offset padded back into place, summed).
    cols = g.reshape(-1, w.shape[3]) @ w.reshape(-1, w.shape[3]).T
    col2im = jax.linear_transpose(
        lambda a: im2col(a, w.shape[:2], strides, padding),
        jax.ShapeDtypeStruct(x_shape, g.dtype),
    )
    return col2im(cols.reshape(*g.shape[:3], -1))[0]


def _bwd(strides, padding, residuals, g):
    x, w = residuals
    return (
        input_grad(g, w, x.shape, strides, padding),
        weight_grad(x, g, w.shape, strides, padding),
    )


canonical_conv.defvjp(_fwd, _bwd)


# Images per block of `weight_grad`: as many as keep a block's im2col columns within
# about L2 (1 MiB per core here), so that they are written and read back in cache.
WGRAD_BLOCK_BYTES = 1 << 20


def _padded_patch_slices(x, kernel_hw, strides, padding, spatial_axes):
    """The strided slices of zero-padded `x`, one per kernel offset (kh, kw order).

    `spatial_axes` are x's (height, width) axes; each slice keeps every other axis
    whole and has the output's height and width on those axes.
    """
    pads = [(0, 0, 0)] * x.ndim
    out = []
    for d, (lo, hi) in zip(spatial_axes, padding, strict=True):
        k, s = kernel_hw[len(out)], strides[len(out)]
        n_out = (x.shape[d] + lo + hi - k) // s + 1
        out.append(n_out)
        pads[d] = (lo, (n_out - 1) * s + k - x.shape[d] - lo, 0)
    xp = lax.pad(x, jnp.zeros((), x.dtype), pads)
    slices = []
    for offsets in itertools.product(*map(range, kernel_hw)):
        start, limit, step = [0] * x.ndim, list(xp.shape), [1] * x.ndim
        for d, o, n_out, s in zip(spatial_axes, offsets, out, strides, strict=True):
            start[d], limit[d], step[d] = o, o + (n_out - 1) * s + 1, s
        slices.append(lax.slice(xp, start, limit, step))
    return slices


def im2col(x, kernel_hw, strides, padding):
    """Patches of NHWC `x`: (N, OH, OW, KH * KW * C), ordered (kh, kw, c).

    Built from strided slices of the padded input (a copy per kernel offset), so
    that XLA fuses x's producers into them in x's own memory order.
    """
    slices = _padded_patch_slices(x, kernel_hw, strides, padding, (1, 2))
    return jnp.concatenate(slices, axis=-1)


def image_block(n: int, bytes_per_image: int) -> int:
    """The largest divisor of `n` whose images fit `WGRAD_BLOCK_BYTES` (at least 1)."""
    fit = max(1, WGRAD_BLOCK_BYTES // max(1, bytes_per_image))
    return max(b for b in range(1, min(n, fit) + 1) if n % b == 0)


# A mesh set while tracing inside `split_weight_gradients(mesh)`.
_SPLIT_MESH = [None]


@contextlib.contextmanager
def split_weight_gradients(mesh):
    """Trace weight gradients as per-device sums over `mesh`'s one axis.

    For one victim whose batch is split over the devices of a 1-D mesh
    (victims/data_parallel.py): each device computes its own images' share of
    `weight_grad`, and one all-reduce adds them up. XLA's partitioner cannot split
    `weight_grad`'s loop over blocks of images by itself; it would gather the whole
    batch and compute the whole gradient on every device.
    """
    _SPLIT_MESH.append(mesh)
    try:
        yield
    finally:
        _SPLIT_MESH.pop()


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def weight_grad(x, g, kernel_shape, strides, padding):
    """dL/dw of a conv: the im2col GEMM sum_{n,i,j} P[(n,i,j), (a,b,c)] g[(n,i,j), o].

    A loop over blocks of images, each block's patches in cache, each a plain GEMM
    (O, pixels) x (pixels, KH KW C) of g transposed and im2col's own patches
    (`_block_weight_grad`), transposed once at the end. Why not a convolution: the
    weight gradient as a canonical conv needs x transposed to (C, H, W, N), and XLA
    fuses x's producers (BatchNorm, ReLU, residual sums, layers deep) into that
    transpose, recomputing them in cache-hostile order (a third of a ResNet-20
    training step, `python benchmarks/victim_speed.py --profile`); the loop's
    operands are materialised once, in their own order.
    """
    mesh = _SPLIT_MESH[-1]
    if mesh is None or x.shape[0] % mesh.size:
        return _blocked_weight_grad(x, g, kernel_shape, strides, padding)
    (axis,) = mesh.axis_names

    def per_device(x, g):
        dw = _blocked_weight_grad(x, g, kernel_shape, strides, padding)
        return lax.psum(dw, axis)

    split, whole = jax.sharding.PartitionSpec(axis), jax.sharding.PartitionSpec()
    # check_vma off: the block loop's zero carry would otherwise need a pcast.
    return jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(split, split),
        out_specs=whole,
        check_vma=False,
    )(x, g)


def _block_weight_grad(xb, gb, kernel_hw, strides, padding):
    """One block's dL/dw transposed, (O, KH KW C): g's (O, pixels) x im2col patches.

    Not (KH KW C, pixels) x (pixels, O) on channel-major patches, the form of
    2026-12-01/02 and about as fast alone (0.8-1.2x this one per stage, `taskset -c 0
    python benchmarks/weight_grad.py` and `--stages roadsign34 --batch 64`): inside
    victims trained in traced trials over several CPU devices, XLA:CPU's run of that
    form grows the process's memory by ~11 MB/s for as long as the program runs
    (`python benchmarks/traced_victim_memory.py`), which took a MetaPoison run to
    15.8 GB. Against contracting both operands' pixel axis on im2col's own layout,
    this form is 1.0-1.3x faster per stage (the same script's `pixel_major`).
    """
    cols = im2col(xb, kernel_hw, strides, padding)
    return gb.reshape(-1, gb.shape[-1]).T @ cols.reshape(-1, cols.shape[-1])


def _blocked_weight_grad(x, g, kernel_shape, strides, padding):
    """`weight_grad` on one device: the loop over blocks of images."""
    kh, kw, cin, cout = kernel_shape
    n = x.shape[0]
    depth = kh * kw * cin
    block = image_block(n, g.shape[1] * g.shape[2] * depth * x.dtype.itemsize)

    def block_grad(xb, gb):
        return _block_weight_grad(xb, gb, (kh, kw), strides, padding)

    if block == n:
        dw_t = block_grad(x, g)
    else:
        blocks = (
            x.reshape(n // block, block, *x.shape[1:]),
            g.reshape(n // block, block, *g.shape[1:]),
        )
        dw_t, _ = lax.scan(
            lambda acc, b: (acc + block_grad(*b), None),
            jnp.zeros((cout, depth), jnp.result_type(x, g)),
            blocks,
        )
    dw = dw_t.T
    return dw.reshape(kh, kw, cin, cout)


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
):
    """Drop-in for `lax.conv_general_dilated` (as `flax.linen.Conv` calls it).

    Plain 2-D NHWC/HWIO convolutions go through `canonical_conv`; anything else
    (dilations, groups, other layouts, a precision request) through lax unchanged.
    """
    plain = (
        not _STOCK[-1]
        # Accelerators keep XLA's own convolution and gradients: every rewrite
        # here is for XLA:CPU's kernels.
        and jax.default_backend() == "cpu"
        and lhs.ndim == 4
        and feature_group_count == 1
        and batch_group_count == 1
        and precision is None
        and preferred_element_type is None
        and all(d == 1 for d in (lhs_dilation or (1, 1)))
        and all(d == 1 for d in (rhs_dilation or (1, 1)))
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        == lax.conv_dimension_numbers(lhs.shape, rhs.shape, CANONICAL)
    )
    if not plain:
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation,
            rhs_dilation,
            dimension_numbers,
            feature_group_count,
            batch_group_count,
            precision,
            preferred_element_type,
        )
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(
            lhs.shape[1:3], rhs.shape[:2], window_strides, padding
        )
    strides = tuple(window_strides)
    padding = tuple(tuple(int(p) for p in pair) for pair in padding)
    return canonical_conv(lhs, rhs, strides, padding)


def _weight_grad_fwd(x, g, kernel_shape, strides, padding):
    return weight_grad(x, g, kernel_shape, strides, padding), (x, g)


def _weight_grad_bwd(kernel_shape, strides, padding, residuals, dw_bar):
    """`weight_grad` is bilinear: <W(x, g), v> = <conv(x, v), g>, so its cotangents
    are a forward conv (for g) and an input gradient (for x), both canonical: the
    second order of a training step (metagradients) reaches the same kernels."""
    x, g = residuals
    dw_bar = dw_bar.astype(jnp.result_type(x, g))
    return (
        input_grad(g, dw_bar, x.shape, strides, padding),
        canonical_conv(x, dw_bar, strides, padding),
    )


weight_grad.defvjp(_weight_grad_fwd, _weight_grad_bwd)
