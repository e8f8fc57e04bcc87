"""Models: pretrained accuracies, weight loading errors, architectures."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpoison import UserInputError
from jaxpoison.models import (
    WEIGHTS_DIR_ENV,
    cifar10_weights,
    default_weights_dir,
    get_model,
    head_variables,
    initial_model,
    load_pretrained,
    shipped_weights,
    task_model,
)
from jaxpoison.models.alexnet import local_response_norm
from jaxpoison.victims import evaluate

# ../shared/data/README.md: reference PyTorch accuracy of these weights on our
# JPEG copy of the CIFAR-10 test set.
REFERENCE_ACCURACY = {
    "resnet20": 81.03,
    "resnet32": 82.56,
    "resnet44": 82.67,
    "resnet56": 83.20,
}


@pytest.fixture(scope="module")
def cifar_test(cifar_tfds_dir):
    from jaxpoison.data import load_cifar10

    return load_cifar10("test", cifar_tfds_dir)


# ResNet-32, -44 and -56 run with -m slow (~40 s each on the 2-core CI machine) to
# keep the default run under 15 minutes; ResNet-20 checks the same loader and
# BatchNorm folding.
@pytest.mark.realdata
@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=[pytest.mark.slow] if name != "resnet20" else [])
        for name in sorted(REFERENCE_ACCURACY)
    ],
)
def test_pretrained_accuracy_matches_reference(name, shared_data, cifar_test):
    model, variables = load_pretrained(
        name, str(shared_data / "weights" / f"{name}_cifar10.npz")
    )
    accuracy = 100 * float(
        jax.jit(
            lambda v: evaluate(
                model, v, cifar_test.images, cifar_test.labels, batch_size=1000
            )["accuracy"]
        )(variables)
    )
    assert abs(accuracy - REFERENCE_ACCURACY[name]) <= 0.05


def test_shipped_weights_are_resnet20():
    model, variables = load_pretrained("resnet20", shipped_weights("resnet20"))
    logits, features = model.apply(variables, jnp.zeros((2, 32, 32, 3)))
    assert logits.shape == (2, 10) and features.shape == (2, 64)


def test_cifar10_weights_prefers_the_shipped_checkpoint(tmp_path):
    assert cifar10_weights("resnet20", str(tmp_path)) == shipped_weights("resnet20")
    assert cifar10_weights("resnet32", str(tmp_path)) == str(
        tmp_path / "resnet32_cifar10.npz"
    )


def test_weights_dir_defaults_to_the_environment_then_shared_data(monkeypatch):
    monkeypatch.setenv(WEIGHTS_DIR_ENV, "/elsewhere")
    assert cifar10_weights("resnet32") == "/elsewhere/resnet32_cifar10.npz"
    monkeypatch.delenv(WEIGHTS_DIR_ENV)
    # Beside the checkout, whatever the working directory: ../shared/data/weights.
    assert default_weights_dir().endswith("shared/data/weights")


def test_weights_that_do_not_fit_raise_one_line(tmp_path):
    path = tmp_path / "resnet32.npz"
    with np.load(shipped_weights("resnet20")) as npz:
        state = dict(npz)
    state["layer3.3.conv1.weight"] = state["layer3.2.conv1.weight"]  # a 4th block
    np.savez(path, **state)
    with pytest.raises(UserInputError, match="does not fit") as e:
        load_pretrained("resnet20", str(path))
    assert "\n" not in str(e.value)


def test_weights_with_wrong_shape_raise(tmp_path):
    path = tmp_path / "bad.npz"
    with np.load(shipped_weights("resnet20")) as npz:
        state = dict(npz)
    state["linear.weight"] = np.zeros((100, 64), np.float32)  # CIFAR-100 head
    np.savez(path, **state)
    with pytest.raises(UserInputError, match="linear/kernel has shape"):
        load_pretrained("resnet20", str(path))


def test_missing_weights_file_raises():
    with pytest.raises(UserInputError, match="not found"):
        load_pretrained("resnet20", "/nonexistent/weights.npz")


def test_unknown_model_name_raises():
    with pytest.raises(UserInputError, match="unknown model 'resnet21'"):
        get_model("resnet21")


@pytest.mark.parametrize(
    "name, features, logits_shape",
    [("alexnet_frogs", 192, (10,)), ("resnet18", 512, (10,)), ("resnet56", 64, (10,))],
)
def test_feature_and_logit_shapes(name, features, logits_shape):
    model = get_model(name)
    # Shapes only: traced, not run (running ResNet-18 eagerly took 18 s).
    variables = jax.eval_shape(model.init, jax.random.key(0))
    images = jax.ShapeDtypeStruct((3, 32, 32, 3), jnp.float32)
    logits, feats = jax.eval_shape(model.apply, variables, images)
    assert feats.shape == (3, features) and logits.shape == (3, *logits_shape)


def test_roadsign_model_has_class_and_box_heads():
    model = get_model("roadsign_resnet34", image_size=64)

    @jax.jit  # one compilation, not eager op-by-op dispatch: 11.6 s -> 8.5 s here
    def heads(images):
        variables = model.init(jax.random.key(0))
        (out, feats), stats = model.apply_train(variables, images, all_heads=True)
        return (
            ((out, feats), stats),
            model.apply(variables, images),
            model.apply(variables, images, all_heads=True)[0]["class"],
            model.apply_train(variables, images)[0][0],
            model.apply_head(head_variables(variables), feats),
        )

    ((out, feats), stats), (logits, _), eval_class, train_logits, head = heads(
        jnp.zeros((2, 64, 64, 3))
    )
    assert model.heads == ("class", "box")
    assert out["class"].shape == (2, 4) and out["box"].shape == (2, 4)
    assert feats.shape == (2, 512) and set(stats) == {"backbone", "head"}
    # Where a caller wants logits, it gets the class head's (no dict leaks out).
    assert logits.shape == (2, 4)
    np.testing.assert_allclose(logits, eval_class)
    np.testing.assert_allclose(train_logits, out["class"])
    assert head.shape == (2, 4)


def test_alexnet_layer_sizes_follow_poison_frogs_table1():
    variables = get_model("alexnet_frogs").init(jax.random.key(0))
    shapes = jax.tree.map(jnp.shape, variables["params"])
    assert shapes["backbone"]["conv1"]["kernel"] == (5, 5, 3, 64)
    assert shapes["backbone"]["conv2"]["kernel"] == (5, 5, 64, 64)
    # 32 -> 16 -> 8 after two stride-2 pools: 8 * 8 * 64 inputs to fc 384.
    assert shapes["backbone"]["fc1"]["kernel"] == (8 * 8 * 64, 384)
    assert shapes["backbone"]["fc2"]["kernel"] == (384, 192)
    assert shapes["head"]["fc3"]["kernel"] == (192, 10)


def test_local_response_norm_matches_tensorflow():
    tf = pytest.importorskip("tensorflow")
    x = np.random.default_rng(0).normal(size=(2, 5, 5, 64)).astype(np.float32)
    expected = tf.nn.local_response_normalization(
        x, depth_radius=4, bias=1.0, alpha=0.001 / 9.0, beta=0.75
    ).numpy()
    np.testing.assert_allclose(
        local_response_norm(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-6
    )


def test_resnet_shortcut_matches_torch_option_a_padding():
    # Option A (He et al. 2016): subsample by 2 and pad channels with zeros on
    # both sides; compare the block's shortcut path to a hand-written numpy one.
    from jaxpoison.models.resnet_cifar import BasicBlock

    x = np.random.default_rng(1).normal(size=(1, 8, 8, 16)).astype(np.float32)
    block = BasicBlock(32, 2)
    variables = block.init(jax.random.key(0), x, False)
    zeroed = jax.tree.map(jnp.zeros_like, variables["params"])  # residual branch = 0
    out = block.apply({**variables, "params": zeroed}, x, False)
    expected = np.maximum(np.pad(x[:, ::2, ::2], ((0, 0),) * 3 + ((8, 8),)), 0)
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_initial_and_task_models_keep_the_pretrained_extractor():
    _, shipped = load_pretrained("resnet20", shipped_weights("resnet20"))
    key = jax.random.key(3)

    def same(a, b):
        return all(
            np.array_equal(x, y)
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        )

    model, scratch = initial_model("resnet20", 5, key, "scratch")
    assert same(scratch, model.init(key))
    _, ten = initial_model("resnet20", 10, key)
    assert same(ten, shipped)
    _, five = initial_model("resnet20", 5, key)
    assert same(head_variables(five), head_variables(scratch))
    body = {k: v for k, v in five["params"].items() if k in shipped["params"]}
    kept = [k for k in body if not same(body[k], shipped["params"][k])]
    assert len(kept) == 1  # only the head differs
    with pytest.raises(UserInputError, match="init must be"):
        initial_model("resnet20", 5, key, "imagenet")
    _, task = task_model("resnet20", shipped, 2)
    head = head_variables(task)
    assert all(not np.any(x) for x in jax.tree.leaves(head))
    assert jax.tree.leaves(head)[0].shape[-1] == 2
