"""Box-aware rotation/flip/crop (victims/box_augment.py) and the CIFAR-backbone
road-sign models: against np.rot90, mirrors, a rotated mask's bounding box, and the
CIFAR ResNet the backbone comes from."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpoison.models import (
    get_model,
    graft_backbone,
    load_pretrained,
    shipped_weights,
)
from jaxpoison.victims import box_augment as ba


def _one(angle, flip, offset):
    return ba.Transform(jnp.float32(angle), jnp.bool_(flip), jnp.asarray(offset))


def test_quarter_turn_without_crop_is_rot90_clockwise_and_moves_the_box():
    image = np.random.default_rng(0).uniform(size=(8, 8, 3)).astype(np.float32)
    t = _one(90.0, False, [0.0, 0.0])
    out = jax.jit(ba.warp_image, static_argnums=2)(jnp.asarray(image), t, 0.0)
    np.testing.assert_allclose(out, np.rot90(image, k=-1), atol=1e-5)
    # Clockwise: the top-left quarter goes to the top-right.
    box = ba.warp_box(jnp.array([0.0, 0.0, 0.5, 0.25]), t, 0.0)
    np.testing.assert_allclose(box, [0.0, 0.5, 0.25, 1.0], atol=1e-6)


def test_flip_and_centre_crop():
    image = np.random.default_rng(1).uniform(size=(8, 8, 3)).astype(np.float32)
    t = _one(0.0, True, [0.0, 0.0])
    out = jax.jit(ba.warp_image, static_argnums=2)(jnp.asarray(image), t, 0.0)
    np.testing.assert_allclose(out, image[:, ::-1], atol=1e-6)
    np.testing.assert_allclose(
        ba.warp_box(jnp.array([0.1, 0.2, 0.5, 0.3]), t, 0.0),
        [0.1, 0.7, 0.5, 0.8],
        atol=1e-6,
    )
    # Margin 1/8 of 8 px: the centre crop is pixels 1..6, resized to 8 px.
    cfg = ba.BoxAugment(crop_margin=1 / 8)
    c = jax.tree.map(lambda a: a[0], ba.centre((1,), cfg))
    box = ba.warp_box(jnp.array([0.125, 0.25, 0.875, 0.5]), c, cfg.crop_margin)
    np.testing.assert_allclose(box, [0.0, 1 / 6, 1.0, 0.5], atol=1e-6)


def test_box_follows_the_bounding_box_of_the_transformed_mask():
    """The studies' way: rotate/flip/crop a mask of the box with the image and take
    the mask's bounding box."""
    size, cfg = 64, ba.BoxAugment(rotation=10.0, crop_margin=0.05)
    boxes = jnp.array([[0.2, 0.3, 0.6, 0.55], [0.5, 0.1, 0.9, 0.4]])
    rows, cols = np.mgrid[:size, :size] + 0.5
    masks = np.stack(
        [
            (rows / size >= b[0])
            & (rows / size <= b[2])
            & (cols / size >= b[1])
            & (cols / size <= b[3])
            for b in np.asarray(boxes)
        ]
    ).astype(np.float32)[..., None]
    t = ba.draw(jax.random.key(3), (2,), cfg)
    warp = jax.jit(ba.warp, static_argnums=3)
    warped, moved = warp(jnp.asarray(masks), boxes, t, cfg.crop_margin)
    for m, b in zip(np.asarray(warped)[..., 0], np.asarray(moved), strict=True):
        ys, xs = np.nonzero(m > 0.5)
        ref = [
            ys.min() / size,
            xs.min() / size,
            (ys.max() + 1) / size,
            (xs.max() + 1) / size,
        ]
        np.testing.assert_allclose(b, ref, atol=1.6 / size)


def test_poisons_get_the_transform_of_the_copies_they_replace():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    boxes = np.tile(np.array([[0.1, 0.1, 0.9, 0.9]], np.float32), (5, 1))
    copies, _, transforms = ba.epoch_copies(
        images, boxes, jax.random.key(0), 3, ba.BoxAugment()
    )
    rows = jnp.array([3, -1, 1])
    index = ba.copy_rows(rows, 3, 5)
    np.testing.assert_array_equal(index, [3, -1, 1, 8, -1, 6, 13, -1, 11])
    poisons = jax.jit(ba.warp_rows, static_argnums=4)(
        jnp.asarray(images[[3, 0, 1]], jnp.float32) / 255.0,
        boxes[:3],
        rows,
        transforms,
        ba.BoxAugment().crop_margin,
    )
    used = np.asarray(index) >= 0
    np.testing.assert_array_equal(
        np.round(np.asarray(poisons)[used] * 255), copies[np.asarray(index)[used]]
    )


def test_bad_ranges_are_one_line_errors():
    with pytest.raises(Exception, match="crop_margin"):
        ba.BoxAugment(crop_margin=0.5)


def test_grafted_backbone_is_the_cifar_resnets_and_the_heads_stay_fresh():
    model = get_model("roadsign_resnet20", num_classes=4)
    _, cifar = load_pretrained("resnet20", shipped_weights("resnet20"))
    fresh = jax.eval_shape(model.init, jax.random.key(0))
    fresh = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), fresh)
    variables = graft_backbone(fresh, cifar)
    # The same backbone module (ResNetCifarBackbone), so the same variable tree.
    for col in ("params", "batch_stats"):
        jax.tree.map(
            np.testing.assert_array_equal,
            variables[col]["backbone"],
            cifar[col]["backbone"],
        )
        assert set(variables[col]["head"]) == {"class_bn", "box_bn"} | (
            {"class_fc", "box_fc"} if col == "params" else set()
        )
    assert variables["params"]["head"]["class_fc"]["kernel"].shape == (64, 4)
    np.testing.assert_array_equal(variables["params"]["head"]["box_fc"]["bias"], 1.0)
