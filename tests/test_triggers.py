"""Backdoor triggers: each against a hand computation or a numpy loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpoison import UserInputError
from jaxpoison.attacks import triggers as tr


def _image(h=16, w=16, c=3, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(0.1, 0.9, (h, w, c)))


def test_blend_is_eq7_elementwise():
    x, t = _image(seed=0), _image(seed=1)
    m = (np.random.default_rng(2).uniform(size=(16, 16, 1)) > 0.5).astype(np.float32)
    a = 0.3
    expected = ((1 - a) * np.asarray(x) + a * np.asarray(t)) * (1 - m) + np.asarray(
        x
    ) * m
    np.testing.assert_allclose(tr.blend(x, t, a, m), expected, rtol=1e-6)
    # alpha 1 without a mask is T(x); a full mask keeps x.
    np.testing.assert_allclose(tr.blend(x, t, 1.0), t)
    np.testing.assert_allclose(tr.blend(x, t, 0.7, np.ones((16, 16, 1))), x)


def test_patch_vmapped_with_traced_positions_equals_numpy_slicing():
    images = jnp.stack([_image(seed=s) for s in range(4)])
    tops, lefts = jnp.array([0, 3, 10, 14]), jnp.array([5, 0, 12, 14])
    color = jnp.array([1.0, 0.5, 0.0])
    out = jax.jit(jax.vmap(lambda x, t, lft: tr.patch(x, t, lft, 4, color)))(
        images, tops, lefts
    )
    for i in range(4):
        ref = np.array(images[i])
        t, lft = int(tops[i]), int(lefts[i])
        ref[t : t + 4, lft : lft + 4] = [1.0, 0.5, 0.0]  # numpy cuts at the border
        np.testing.assert_array_equal(out[i], ref)


def test_patch_in_box_at_the_hand_computed_square():
    """Box [0.25, 0.5, 0.75, 1.0] of a 64-px image: rows 16..48, cols 32..64, the
    shorter side 32 px; size 0.25 -> an 8-px side centred on (32, 48): rows 28..35,
    cols 44..51."""
    x = jnp.zeros((64, 64, 3))
    out = tr.patch_in_box(x, jnp.array([0.25, 0.5, 0.75, 1.0]), 0.25, (1.0, 1.0, 0.0))
    expected = np.zeros((64, 64, 3))
    expected[28:36, 44:52] = [1.0, 1.0, 0.0]
    np.testing.assert_array_equal(out, expected)
    # rel (1, 1) puts the centre on the box's corner (48, 64): shifted inside.
    out = tr.patch_in_box(x, jnp.array([0.25, 0.5, 0.75, 1.0]), 0.25, 1.0, (1.0, 1.0))
    expected = np.zeros((64, 64, 3))
    expected[44:52, 56:64] = 1.0
    np.testing.assert_array_equal(out, expected)


def test_patch_in_box_vmapped_over_boxes_equals_a_loop():
    rng = np.random.default_rng(0)
    lo = rng.uniform(0.0, 0.5, (5, 2))
    boxes = jnp.asarray(np.concatenate([lo, lo + rng.uniform(0.1, 0.5, (5, 2))], 1))
    images = jnp.stack([_image(32, 32, seed=s) for s in range(5)])
    color = jnp.array([200.0, 200.0, 100.0]) / 255.0
    out = jax.vmap(lambda x, b: tr.patch_in_box(x, b, 0.2, color))(images, boxes)
    for i in range(5):
        np.testing.assert_array_equal(
            out[i], tr.patch_in_box(images[i], boxes[i], 0.2, color)
        )
    assert not np.allclose(out, images)


@pytest.mark.parametrize("size, side", [(224, 22), (64, 6), (32, 3)])
def test_black_square_scales_22_px_at_22(size, side):
    x = jnp.ones((size, size, 3))
    out = np.asarray(tr.black_square(x))
    expected = np.ones((size, size, 3))
    expected[side : 2 * side, side : 2 * side] = 0.0
    np.testing.assert_array_equal(out, expected)


def test_random_square_is_the_black_square_somewhere_inside():
    x = jnp.ones((32, 32, 3))
    keys = jax.random.split(jax.random.key(0), 64)
    out = np.asarray(jax.vmap(tr.random_square, (0, None))(keys, x))
    corners = set()
    for img in out:
        rows, cols = np.nonzero(img[..., 0] == 0.0)
        assert len(rows) == 9  # 3 x 3, whole, inside the image
        assert rows.max() - rows.min() == 2 and cols.max() - cols.min() == 2
        corners.add((rows.min(), cols.min()))
        np.testing.assert_array_equal(img[..., 0] == 0.0, img[..., 2] == 0.0)
    assert len(corners) > 32  # positions vary with the key


def test_sine_adds_the_column_pattern_clipped():
    x = _image(8, 40, seed=3)
    j = np.arange(40)
    pattern = 0.4 * np.sin(0.05 * np.pi * j)
    expected = np.clip(np.asarray(x) + pattern[None, :, None], 0.0, 1.0)
    np.testing.assert_allclose(tr.sine(x), expected, atol=1e-6)
    # Blended with alpha 0.1 where nothing clips: x + 0.04 sin(0.05 pi j).
    mid = jnp.full((4, 40, 3), 0.5)
    np.testing.assert_allclose(
        tr.blend(mid, tr.sine(mid), 0.1),
        0.5 + 0.1 * np.broadcast_to(pattern[None, :, None], (4, 40, 3)),
        atol=1e-6,
    )
    # reference_width=224 on a 32-px image: column j is at 7 j reference pixels.
    np.testing.assert_allclose(
        tr.sine_pattern(32, reference_width=224),
        0.4 * np.sin(0.05 * np.pi * 7 * np.arange(32)),
        atol=1e-5,
    )


@pytest.fixture(scope="module")
def pca_data():
    """Images whose pixels vary with geometrically decreasing scales (so the
    trailing components are well separated), plus a held-out image."""
    rng = np.random.default_rng(0)
    d = 4 * 4 * 3
    scales = 0.5 ** (np.arange(d) / 6.0)
    rotation, _ = np.linalg.qr(rng.normal(size=(d, d)))
    z = rng.normal(size=(401, d)) * scales
    images = (0.5 + 0.05 * z @ rotation.T).reshape(401, 4, 4, 3)
    return images[:400], images[400]


def test_low_variance_basis_matches_covariance_eigendecomposition(pca_data):
    train, _ = pca_data
    basis = tr.low_variance_basis(train)
    flat = train.reshape(len(train), -1)
    eigvals = np.sort(np.linalg.eigvalsh(np.cov(flat, rowvar=False)))[::-1]
    np.testing.assert_allclose(basis.explained, eigvals / eigvals.sum(), rtol=1e-6)
    k = basis.chosen
    # The fewest trailing components with >= 0.5% of the variance.
    assert basis.explained[-k:].sum() >= 0.005
    assert basis.explained[-k + 1 :].sum() < 0.005
    assert 1 < k < len(basis.explained)


def test_low_variance_pattern_lies_in_the_chosen_components(pca_data):
    train, held_out = pca_data
    basis = tr.low_variance_basis(train)
    pattern = tr.low_variance_pattern(train, held_out).reshape(-1)
    top = basis.components[: -basis.chosen]
    # Orthogonal to every other (higher-variance) component.
    np.testing.assert_allclose(top @ pattern, 0.0, atol=1e-6)
    # And it is the projection of the centred held-out image onto the chosen ones.
    chosen = basis.components[-basis.chosen :]
    centred = held_out.reshape(-1) - train.reshape(400, -1).mean(0)
    np.testing.assert_allclose(chosen @ pattern, chosen @ centred, atol=1e-6)
    applied = tr.low_variance(jnp.full((4, 4, 3), 0.5), pattern.reshape(4, 4, 3))
    np.testing.assert_allclose(
        applied, np.clip(0.5 + pattern.reshape(4, 4, 3), 0, 1), atol=1e-6
    )


def test_make_trigger_names_and_errors():
    x, key = _image(), jax.random.key(1)
    np.testing.assert_array_equal(
        tr.make_trigger("black_square")(key, x), tr.black_square(x)
    )
    np.testing.assert_array_equal(
        tr.make_trigger("random_square")(key, x), tr.random_square(key, x)
    )
    fn = tr.make_trigger("patch", top=1, left=2, size=3, color=0.0)
    np.testing.assert_array_equal(fn(key, x), tr.patch(x, 1, 2, 3, 0.0))
    with pytest.raises(UserInputError, match="black_square.*low_variance.*sine"):
        tr.make_trigger("stripes")
    with pytest.raises(UserInputError, match="patch"):
        tr.make_trigger("patch", top=1)  # missing left, size, color
    with pytest.raises(UserInputError, match="sine"):
        tr.make_trigger("sine", period=3)
