"""Inputs outside the library's contract are refused at the public boundary.

Example-based cases name each misuse the reliability review reproduced; property
tests (hypothesis) check that config parsing and the image checks accept exactly
what they promise.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxpoison.attacks import feature_collision as fc
from jaxpoison.attacks import triggers
from jaxpoison.attacks.backdoor import num_poisons
from jaxpoison.checks import check_known, check_unit_images, require
from jaxpoison.config_args import parse_arg
from jaxpoison.errors import UserInputError

RNG = np.random.default_rng(0)
IMAGES = RNG.uniform(0.0, 1.0, (2, 8, 8, 3)).astype(np.float32)


@pytest.mark.parametrize(
    "images, message",
    [
        (IMAGES * 255.0, "0-255 pixels"),
        ((IMAGES * 255).astype(np.uint8), "dtype uint8"),
        (IMAGES[:0], "empty batch"),
        (IMAGES[0, :, :, 0], "rank 4"),
        (IMAGES / 255.0 / 255.0, "divided by 255 twice"),
        (np.where(IMAGES > 0.5, np.nan, IMAGES), "NaN"),
    ],
)
def test_bad_images_are_refused_with_what_was_expected(images, message):
    with pytest.raises(UserInputError, match=message):
        check_unit_images(images)


def test_crafting_needs_one_target_per_base():
    with pytest.raises(UserInputError, match="one target per base"):
        fc.init(IMAGES, IMAGES[:1], fc.FCConfig())


@pytest.mark.parametrize("field", ["step_size", "epsilon", "beta0"])
def test_crafting_settings_must_be_finite(field):
    with pytest.raises(UserInputError, match=f"FCConfig.{field}"):
        fc.FCConfig(**{field: float("nan")})


def test_blend_alpha_outside_unit_interval_is_refused():
    with pytest.raises(UserInputError, match="blend alpha"):
        triggers.blend(IMAGES[0], IMAGES[1], 1.5)


def test_trigger_colour_above_one_is_refused():
    with pytest.raises(UserInputError, match="patch colour"):
        triggers.patch(IMAGES[0], 1, 1, 3, (255, 0, 0))


def test_triggers_take_one_image():
    with pytest.raises(UserInputError, match="one image"):
        triggers.patch(IMAGES, 1, 1, 3, (1.0, 0.0, 0.0))


def test_negative_class_size_is_refused():
    with pytest.raises(UserInputError, match="class size"):
        num_poisons(-5, 0.5)


@settings(max_examples=60, deadline=None)
@given(
    low=st.floats(0.0, 1.0, allow_nan=False),
    high=st.floats(0.0, 1.0, allow_nan=False),
)
def test_any_float_images_in_unit_range_pass(low, high):
    low, high = sorted((low, high))
    if 0.0 < high <= 1.0 / 255.0:
        high = 0.5  # the divided-twice heuristic's window; covered above
    images = np.linspace(low, high, 2 * 4 * 4 * 3, dtype=np.float32)
    check_unit_images(images.reshape(2, 4, 4, 3))


@settings(max_examples=60, deadline=None)
@given(value=st.floats(allow_nan=True, allow_infinity=True, width=32))
def test_values_outside_unit_range_never_pass(value):
    images = np.full((1, 2, 2, 3), 0.5, np.float32)
    images[0, 0, 0, 0] = np.float32(value)
    inside = np.isfinite(np.float32(value)) and 0.0 <= np.float32(value) <= 1.0
    if inside:
        check_unit_images(images)
    else:
        with pytest.raises(UserInputError):
            check_unit_images(images)


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(-(2**31), 2**31 - 1),
    flag=st.booleans(),
    name=st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12),
)
def test_config_arguments_parse_to_their_declared_types(n, flag, name):
    parsed = parse_arg(f"count={n},on={str(flag).lower()}", count=0, on=False)
    assert parsed == {"count": n, "on": flag, "runlocal": False}
    if name not in ("count", "on", "runlocal"):
        with pytest.raises(UserInputError, match="unknown config argument"):
            parse_arg(f"{name}=1", count=0, on=False)


@settings(max_examples=40, deadline=None)
@given(value=st.text(min_size=1, max_size=8).filter(lambda v: "," not in v))
def test_wrongly_typed_config_arguments_are_one_clear_error(value):
    try:
        int(value)
    except ValueError:
        with pytest.raises(UserInputError, match="is not of type int"):
            parse_arg(f"count={value}", count=0)


def test_runlocal_keeps_arguments_given_explicitly():
    from tests.conftest import load_config

    assert load_config("quickstart.py", "runlocal").num_targets == 4
    assert load_config("quickstart.py", "runlocal,num_targets=50").num_targets == 50
    assert load_config("quickstart.py", "num_targets=50,runlocal").num_targets == 50


def test_poison_rows_out_of_range_are_refused():
    from jaxpoison.victims import make_train_data

    images = np.zeros((5, 4, 4, 3), np.uint8)
    labels = np.zeros(5, np.int32)
    make_train_data(images, labels, images[:2], np.array([-1, 4]), labels[:2])
    with pytest.raises(UserInputError, match="poison row 5 is out of range"):
        make_train_data(images, labels, images[:2], np.array([0, 5]), labels[:2])


def test_config_checks_are_one_line_naming_the_bad_value():
    check_known("dataset", "cifar10", ("cifar10", "flowers"))
    check_known("trigger", ["sine"], {"sine": 0.1})
    with pytest.raises(UserInputError, match="^unknown dataset 'x'; known: a, b$"):
        check_known("dataset", "x", ("a", "b"))
    with pytest.raises(UserInputError, match="unknown trigger 'c'"):
        check_known("trigger", ["a", "c", "d"], ("a", "b"))
    require(True, "never raised")
    with pytest.raises(UserInputError, match="^seeds=0: need at least 1$"):
        require(False, "seeds=0: need at least 1")


def test_road_sign_variants_keep_arguments_given_explicitly():
    from tests.conftest import load_config

    given = load_config("roadsigns_cleanlabel.py", "manual_dir=x,runlocal,targets=5")
    assert given.targets_per_type == 5 and given.image_size == 16
    assert load_config("badnets_roadsigns.py", "runlocal,seeds=3").seeds == (0, 1, 2)
    assert load_config("badnets_roadsigns.py", "runlocal").seeds == (0,)


@settings(max_examples=40, deadline=None)
@given(alpha=st.floats(-2.0, 3.0, allow_nan=False))
def test_blend_accepts_exactly_the_unit_interval(alpha):
    x, t = IMAGES[0], IMAGES[1]
    if 0.0 <= alpha <= 1.0:
        out = np.asarray(triggers.blend(x, t, alpha))
        assert out.min() >= -1e-6 and out.max() <= 1.0 + 1e-6
    else:
        with pytest.raises(UserInputError, match="blend alpha"):
            triggers.blend(x, t, alpha)


@settings(max_examples=40, deadline=None)
@given(colour=st.lists(st.floats(-1.0, 300.0, allow_nan=False), min_size=3, max_size=3))
def test_patch_colours_are_pixels_in_unit_range(colour):
    if all(0.0 <= c <= 1.0 for c in colour):
        out = np.asarray(triggers.patch(IMAGES[0], 1, 1, 3, colour))
        np.testing.assert_allclose(out[1, 1], colour, rtol=1e-6, atol=1e-7)
    else:
        with pytest.raises(UserInputError, match="patch colour"):
            triggers.patch(IMAGES[0], 1, 1, 3, colour)
