"""A convolution's weight gradient on XLA:CPU, twelve ways, at a CNN's stages.

dL/dw[a, b, c, o] = sum_{n,i,j} xp[n, i + a, j + b, c] g[n, i, j, o] for a 3x3,
stride-1, 'SAME' convolution (xp: x zero-padded by one), computed as:
  ours        `models/conv.py: weight_grad`: GEMMs over blocks of images whose
              patches fit `WGRAD_BLOCK_BYTES`, each (O, pixels) x (pixels, KH KW C)
              of g transposed and im2col's own patches (the default path on CPU)
  ours_4mb    the same with 4 MiB blocks
  channel_major the same blocks, each (KH KW C, pixels) x (pixels, O) on patches
              built channel-major (the default 2026-12-01/02; it leaks memory in
              traced multi-device training, benchmarks/traced_victim_memory.py)
  pixel_major the same blocks with im2col's own (pixels, KH KW C) patches, the GEMM
              contracting both operands' leading axis (the default until 2026-12)
  padsum      `ours` with the patches built as a sum of the nine slices, each
              zero-padded in channels to the patch width (one fusion, nine times
              the writes)
  select_n    `ours` with the patches built by `lax.select_n` over the nine
              slices, each tiled to the patch width, picked by channel group
  ynn_gemm    `ours` with g's transpose materialised behind `lax.optimization_barrier`:
              in `ours` XLA folds that transpose into the dot, which then runs on
              XLA's own dot kernel rather than YNNPACK; here YNNPACK takes the GEMM
  row_concat  `ours` with im2col built per kernel row: KH concatenates of KW slices
              (XLA fuses each row's slices into its concatenate, where the nine-way
              concatenate is fed by nine separate slice copies), KH GEMMs
  split_taps  width taps on x, height taps on g: per block, x padded and flattened
              to rows, its KW row-shifted copies side by side (pixels, KW C); g
              embedded in the same padded grid, its KH copies shifted by whole grid
              rows side by side (pixels, KH O); one GEMM (KH O, pixels) x (pixels,
              KW C). A third of im2col's copy traffic when C = O, the same
              arithmetic plus the padding's rows
  shift_dots  nine GEMMs, one per kernel offset, on shifted slices of xp (no im2col)
  as_conv     the canonical convolution of x transposed to (C, H, W, N) with g as
              an (H, W, N, O) kernel (the form whose transposes XLA fused badly
              inside a training step)
  stock       `jax.vjp` of `lax.conv_general_dilated` w.r.t. the kernel (XLA's own)
Each is one jitted function of (x, g) alone, so XLA cannot fuse any producer into
it: this is the kernel's own speed, not its speed inside a step. Times are medians
of `--repeats` calls after a compiling warm-up; GFLOP/s count 2 N H W 9 C O. Every
form is checked against `ours` (max abs difference printed).

`--layouts` times instead the bare GEMM of one block's patches in three layouts:
(pixels, K)^T (pixels, O), im2col's own; (K, pixels) x (pixels, O), channel-major;
and (O, pixels) x (pixels, K), the one `ours` uses; at each stage's block of
`WGRAD_BLOCK_BYTES`. `--stages roadsign34` uses the road-sign ResNet-34's stages at
32 px (batch 64) instead of ResNet-20's (batch 128). `--block_bytes` times `ours`
instead at each given `conv.WGRAD_BLOCK_BYTES`. `--forms` picks some forms. `--check`
compares every block form (as `patch` would use it) with `jax.vjp` of
`lax.conv_general_dilated` in float64 at several kernels, strides and paddings.

`patch(form)` puts a form's blocks into `models/conv.py`'s weight gradient (any
kernel; `split_taps` at stride 1, `ours` otherwise), for timing it inside a training
step: `benchmarks/victim_speed.py --worker jax --weight_grad FORM` and
`benchmarks/traced_victim_memory.py` use it.

Usage:
  taskset -c 0 python benchmarks/weight_grad.py      # one core, ~1 min
  taskset -c 0 python benchmarks/weight_grad.py --stages roadsign34 --batch 64
  python benchmarks/weight_grad.py --batch 50
  taskset -c 0 python benchmarks/weight_grad.py --layouts   # the bare GEMMs, ~10 s
  taskset -c 0 python benchmarks/weight_grad.py --block_bytes 262144 524288 1048576
  python benchmarks/weight_grad.py --check   # every block form against XLA's, float64
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from narrow_conv import median_ms  # noqa: E402  (this folder, the script's path)

from jaxpoison.models import conv  # noqa: E402

SAME = ((1, 1), (1, 1))
STAGES = {  # (image side, channels) of each stage's 3x3 convs
    "resnet20": ((32, 16), (16, 32), (8, 64)),
    "roadsign34": ((32, 64), (16, 128), (8, 256), (4, 512)),
}


def ours(x, g):
    c, o = x.shape[3], g.shape[3]
    return conv.weight_grad(x, g, (3, 3, c, o), (1, 1), SAME)


def ours_4mb(x, g):
    saved, conv.WGRAD_BLOCK_BYTES = conv.WGRAD_BLOCK_BYTES, 4 << 20
    try:  # read while tracing: the block size is fixed into the jitted program
        return ours(x, g)
    finally:
        conv.WGRAD_BLOCK_BYTES = saved


def channel_major_block(xb, gb, kernel_hw, strides, padding):
    """One block's (KH KW C, O) gradient: (KH KW C, pixels) x (pixels, O) on patches
    built channel-major (x as (C, N, H, W): every kernel offset's slice is a
    (C, pixels) block)."""
    slices = conv._padded_patch_slices(
        jnp.transpose(xb, (3, 0, 1, 2)), kernel_hw, strides, padding, (2, 3)
    )
    cols_t = jnp.stack(slices).reshape(-1, slices[0][0].size)
    return cols_t @ gb.reshape(-1, gb.shape[-1])


def pixel_major_block(xb, gb, kernel_hw, strides, padding):
    """One block's (KH KW C, O) gradient: im2col's (pixels, KH KW C) patches and g
    contracted on their leading (pixel) axis."""
    cols = conv.im2col(xb, kernel_hw, strides, padding)
    cols = cols.reshape(-1, cols.shape[-1])
    contract = (((0,), (0,)), ((), ()))
    return lax.dot_general(cols, gb.reshape(-1, gb.shape[-1]), contract)


def padsum_patches(slices):
    """im2col's (..., KH KW C) patches as a sum of channel-padded slices."""
    k, c = len(slices), slices[0].shape[-1]
    widths = [
        [(0, 0)] * (s.ndim - 1) + [(i * c, (k - 1 - i) * c)]
        for i, s in enumerate(slices)
    ]
    return sum(jnp.pad(s, w) for s, w in zip(slices, widths, strict=True))


def select_n_patches(slices):
    """im2col's (..., KH KW C) patches: each channel picks its offset's slice."""
    k, c = len(slices), slices[0].shape[-1]
    tiled = [jnp.tile(s, (1,) * (s.ndim - 1) + (k,)) for s in slices]
    which = lax.broadcasted_iota(jnp.int32, tiled[0].shape, tiled[0].ndim - 1) // c
    return lax.select_n(which, *tiled)


def patches_block(make_patches):
    """`ours`' block gradient, (g's (O, pixels) x patches) transposed, with its
    patches built by `make_patches` from `conv._padded_patch_slices`."""

    def block_grad(xb, gb, kernel_hw, strides, padding):
        slices = conv._padded_patch_slices(xb, kernel_hw, strides, padding, (1, 2))
        cols = make_patches(slices)
        return (gb.reshape(-1, gb.shape[-1]).T @ cols.reshape(-1, cols.shape[-1])).T

    return block_grad


def ynn_gemm_block(xb, gb, kernel_hw, strides, padding):
    """`ours`' block gradient with g's (O, pixels) transpose kept as its own copy
    (the barrier), so that the GEMM is canonical and XLA hands it to YNNPACK."""
    cols = conv.im2col(xb, kernel_hw, strides, padding)
    g_t = lax.optimization_barrier(gb.reshape(-1, gb.shape[-1]).T)
    # The product behind a barrier too, or XLA folds the final transpose into the
    # dot and makes it non-canonical again.
    return lax.optimization_barrier(g_t @ cols.reshape(-1, cols.shape[-1])).T


def row_concat_block(xb, gb, kernel_hw, strides, padding):
    """One block's (KH KW C, O) gradient: one GEMM per kernel row, each on the
    concatenate of that row's KW slices."""
    slices = conv._padded_patch_slices(xb, kernel_hw, strides, padding, (1, 2))
    g_t = gb.reshape(-1, gb.shape[-1]).T
    kw = kernel_hw[1]
    rows = []
    for a in range(kernel_hw[0]):
        cols = jnp.concatenate(slices[a * kw : (a + 1) * kw], axis=-1)
        rows.append(g_t @ cols.reshape(-1, cols.shape[-1]))
    return jnp.concatenate(rows, axis=1).T


def split_taps_block(xb, gb, kernel_hw, strides, padding):
    """One block's (KH KW C, O) gradient with width taps on x and height taps on g.

    On x padded to the grid (Hp, Wp) = (OH + KH - 1, OW + KW - 1) and flattened to
    rows q, and g embedded at the grid's top left (zero elsewhere):
      dw[a, b] = sum_q x[q + b] g[q - a Wp]   (row q = (n, i + a, j) of the grid),
    so the KW shifted copies of x side by side, X[q] = (x[q], ..., x[q + KW - 1]),
    and the KH of g, G[q] = (g[q], ..., g[q - (KH - 1) Wp]), give every (a, b) in one
    GEMM G^T X. Rows shifted past a block's end meet only g's zero padding."""
    if set(strides) != {1}:
        return conv._block_weight_grad(xb, gb, kernel_hw, strides, padding).T
    (kh, kw), (b, h, w, c), o = kernel_hw, xb.shape, gb.shape[-1]
    oh, ow = gb.shape[1:3]
    hp, wp = oh + kh - 1, ow + kw - 1
    (top, _), (left, _) = padding
    grid = ((0, 0), (top, hp - h - top), (left, wp - w - left), (0, 0))
    rows = b * hp * wp
    x_rows = jnp.pad(jnp.pad(xb, grid).reshape(rows, c), ((0, kw - 1), (0, 0)))
    x_taps = jnp.concatenate([x_rows[d : d + rows] for d in range(kw)], axis=1)
    g_grid = jnp.pad(gb, ((0, 0), (0, kh - 1), (0, kw - 1), (0, 0)))
    g_rows = jnp.pad(g_grid.reshape(rows, o).T, ((0, 0), ((kh - 1) * wp, 0)))
    starts = [(kh - 1 - a) * wp for a in range(kh)]
    g_taps = jnp.concatenate([g_rows[:, s : s + rows] for s in starts], axis=0)
    dw = (g_taps @ x_taps).reshape(kh, o, kw, c)  # (a, o, b, c)
    return dw.transpose(0, 2, 3, 1).reshape(kh * kw * c, o)


BLOCK_FORMS = {  # in the order of the timing table's columns
    "channel_major": channel_major_block,
    "pixel_major": pixel_major_block,
    "padsum": patches_block(padsum_patches),
    "select_n": patches_block(select_n_patches),
    "ynn_gemm": ynn_gemm_block,
    "row_concat": row_concat_block,
    "split_taps": split_taps_block,
}


def patch(form: str) -> None:
    """Replaces `conv._blocked_weight_grad` by `form`'s loop over image blocks
    (`ours` leaves the library's)."""
    if form != "ours":
        conv._blocked_weight_grad = blocked(BLOCK_FORMS[form])


def blocked(block_grad):
    """`weight_grad(x, g, kernel_shape, strides, padding)` summing `block_grad`'s
    (KH KW C, O) gradients over blocks of images, as `models/conv.py` does (`patch`
    puts it there)."""

    def weight_grad(x, g, kernel_shape, strides, padding):
        kh, kw, cin, cout = kernel_shape
        n, depth = x.shape[0], kh * kw * cin
        block = conv.image_block(n, g.shape[1] * g.shape[2] * depth * x.dtype.itemsize)

        def grad(xb, gb):
            return block_grad(xb, gb, (kh, kw), strides, padding)

        if block == n:
            return grad(x, g).reshape(kernel_shape)
        blocks = jax.tree.map(
            lambda a: a.reshape(n // block, block, *a.shape[1:]), (x, g)
        )
        zero = jnp.zeros((depth, cout), jnp.result_type(x, g))
        dw, _ = lax.scan(lambda acc, b: (acc + grad(*b), None), zero, blocks)
        return dw.reshape(kernel_shape)

    return weight_grad


def on_3x3(block_grad):
    """A form of (x, g) for this script's 3x3, stride-1, 'SAME' convolutions: the
    loop over image blocks of `block_grad` (one of `BLOCK_FORMS`)."""

    def form(x, g):
        kernel_shape = (3, 3, x.shape[3], g.shape[3])
        return blocked(block_grad)(x, g, kernel_shape, (1, 1), SAME)

    return form


def shift_dots(x, g):
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    h, w = x.shape[1:3]
    contract = (((0, 1, 2), (0, 1, 2)), ((), ()))
    taps = [
        lax.dot_general(xp[:, a : a + h, b : b + w, :], g, contract)
        for a in range(3)
        for b in range(3)
    ]
    return jnp.stack(taps).reshape(3, 3, x.shape[3], g.shape[3])


def as_conv(x, g):
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = lax.conv_general_dilated(
        jnp.transpose(xp, (3, 1, 2, 0)),  # (C, Hp, Wp, N): batch C, features N
        jnp.transpose(g, (1, 2, 0, 3)),  # (H, W, N, O): an H x W kernel
        (1, 1),
        "VALID",
        dimension_numbers=conv.CANONICAL,
    )  # (C, 3, 3, O)
    return jnp.transpose(out, (1, 2, 0, 3))


def stock(x, g):
    def forward(w):
        return lax.conv_general_dilated(
            x, w, (1, 1), SAME, dimension_numbers=conv.CANONICAL
        )

    kernel = jnp.zeros((3, 3, x.shape[3], g.shape[3]), x.dtype)
    return jax.vjp(forward, kernel)[1](g)[0]


FORMS = {
    "ours": ours,
    "ours_4mb": ours_4mb,
    **{name: on_3x3(block_grad) for name, block_grad in BLOCK_FORMS.items()},
    "shift_dots": shift_dots,
    "as_conv": as_conv,
    "stock": stock,
}


def layouts(batch: int, repeats: int, stages) -> None:
    """The bare weight-gradient GEMM of one block in three layouts, at each stage."""
    pixel_major_dot = jax.jit(
        lambda cols, g: lax.dot_general(cols, g, (((0,), (0,)), ((), ())))
    )
    channel_major_dot = jax.jit(lambda cols_t, g: cols_t @ g)
    g_major_dot = jax.jit(lambda cols, g_t: g_t @ cols)
    print(f"jax {jax.__version__}; one block of a batch of {batch}; ms (GFLOP/s)")
    heads = ("(P, K)^T (P, O)", "(K, P) x (P, O)", "(O, P) x (P, K)")
    print(f"{'block':<28}" + "".join(f"{h:>20}" for h in heads))
    for side, channels in stages:
        depth = 9 * channels
        images = conv.image_block(batch, side * side * depth * 4)
        pixels = images * side * side
        cols = jax.random.normal(jax.random.key(0), (pixels, depth))
        g = jax.random.normal(jax.random.key(1), (pixels, channels))
        cols_t, g_t = jnp.asarray(cols.T), jnp.asarray(g.T)
        flops = 2 * pixels * depth * channels
        cells = []
        for fn, a, b in (
            (pixel_major_dot, cols, g),
            (channel_major_dot, cols_t, g),
            (g_major_dot, cols, g_t),
        ):
            ms = median_ms(lambda fn=fn, a=a, b=b: fn(a, b), repeats)
            cells.append(f"{ms:.3f} ({flops / ms / 1e6:.0f})")
        label = f"{side}x{side} x {channels}, {images} image(s)"
        print(f"{label:<28}" + "".join(f"{c:>20}" for c in cells))


def block_sizes(batch: int, repeats: int, stages, sizes) -> None:
    """`ours` at each `conv.WGRAD_BLOCK_BYTES` in `sizes`, at each stage."""
    print(f"jax {jax.__version__}; batch {batch}; ms per weight gradient of `ours`")
    print(f"{'side x channels':<16}" + "".join(f"{s // 1024:>10} KiB" for s in sizes))
    saved = conv.WGRAD_BLOCK_BYTES
    for side, channels in stages:
        shape = (batch, side, side, channels)
        x = jax.random.normal(jax.random.key(0), shape)
        g = jax.random.normal(jax.random.key(1), shape)
        cells = []
        for size in sizes:
            conv.WGRAD_BLOCK_BYTES = size  # read while tracing, below
            try:
                fn = jax.jit(ours).lower(x, g).compile()
            finally:
                conv.WGRAD_BLOCK_BYTES = saved
            cells.append(f"{median_ms(lambda fn=fn: fn(x, g), repeats):14.2f}")
        print(f"{f'{side}x{side} x {channels}':<16}" + "".join(cells))


CHECK_SHAPES = (  # (height, width, in, out channels, kernel, strides, padding)
    (8, 8, 3, 5, (3, 3), (1, 1), ((1, 1), (1, 1))),
    (7, 9, 4, 6, (3, 3), (1, 1), ((2, 1), (0, 2))),
    (8, 8, 4, 4, (1, 1), (1, 1), ((0, 0), (0, 0))),
    (9, 8, 4, 6, (3, 3), (2, 2), ((1, 1), (1, 1))),
    (6, 6, 2, 3, (2, 3), (1, 1), ((0, 0), (1, 1))),
)


def check() -> None:
    """Every block form against XLA's own weight gradient, in float64."""
    jax.config.update("jax_enable_x64", True)
    worst = 0.0
    for h, w, c, o, kernel, strides, padding in CHECK_SHAPES:
        x = jax.random.normal(jax.random.key(0), (4, h, w, c), jnp.float64)
        zero = jnp.zeros((*kernel, c, o), jnp.float64)

        def forward(k, x=x, strides=strides, padding=padding):
            return lax.conv_general_dilated(
                x, k, strides, padding, dimension_numbers=conv.CANONICAL
            )

        y, vjp = jax.vjp(forward, zero)
        g = jax.random.normal(jax.random.key(1), y.shape, jnp.float64)
        reference = vjp(g)[0]
        for name, block_grad in BLOCK_FORMS.items():
            got = blocked(block_grad)(x, g, zero.shape, strides, padding)
            error = float(jnp.abs(got - reference).max())
            worst = max(worst, error)
            print(f"{name:<14} {kernel} stride {strides} pad {padding}: {error:.1e}")
    print(f"largest difference {worst:.1e}")
    if worst > 1e-10:
        raise SystemExit(f"a form differs from XLA's weight gradient by {worst:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--layouts", action="store_true")
    parser.add_argument("--stages", choices=sorted(STAGES), default="resnet20")
    parser.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS))
    parser.add_argument("--block_bytes", nargs="+", type=int, default=None)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    if args.check:
        return check()
    stages = STAGES[args.stages]
    if args.layouts:
        return layouts(args.batch, max(args.repeats, 50), stages)
    if args.block_bytes:
        return block_sizes(args.batch, args.repeats, stages, args.block_bytes)
    forms = {name: FORMS[name] for name in args.forms}
    print(
        f"jax {jax.__version__}; batch {args.batch}; ms (GFLOP/s), max |diff| to ours"
    )
    print(f"{'side x channels':<16}" + "".join(f"{k:>26}" for k in forms))
    for side, channels in stages:
        shape = (args.batch, side, side, channels)
        x = jax.random.normal(jax.random.key(0), shape)
        g = jax.random.normal(jax.random.key(1), shape)
        flops = 2 * args.batch * side * side * 9 * channels * channels
        reference = jax.jit(ours)(x, g)
        cells = []
        for form in forms.values():
            fn = jax.jit(form)
            seconds = median_ms(lambda: fn(x, g), args.repeats) / 1e3
            diff = float(jnp.abs(fn(x, g) - reference).max())
            cells.append(
                f"{seconds * 1e3:.2f} ({flops / seconds / 1e9:.0f}) {diff:.0e}"
            )
        print(
            f"{f'{side}x{side} x {channels}':<16}" + "".join(f"{c:>26}" for c in cells)
        )


if __name__ == "__main__":
    main()
