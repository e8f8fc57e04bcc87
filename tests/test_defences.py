"""Defences on tiny hand-built cases with independent references: filters find what
was planted; DP clipping against a looped per-example computation; mixup and cutout
in closed form; the trainer's hooks (removed rows, DP) against hand-made steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpoison import UserInputError
from jaxpoison.defences import filtering
from jaxpoison.defences import training as dtrain
from jaxpoison.models import Model
from jaxpoison.victims import TrainConfig, make_train_data, train


def blobs(rng, sizes, centres, scale=0.1):
    """Gaussian blobs around `centres` (rows) with `sizes` points each."""
    return np.concatenate(
        [
            c + scale * rng.normal(size=(n, len(c)))
            for n, c in zip(sizes, centres, strict=True)
        ]
    ).astype(np.float32)


def test_spectral_scores_match_numpy_svd_and_the_planted_outliers_go():
    """Class 0: 40 clean points and 3 shifted along one direction; class 1: 30 clean
    points. Scores equal Tran et al.'s via numpy's float64 SVD; removing 3 per
    class takes exactly the planted 3 from class 0."""
    rng = np.random.default_rng(0)
    d = 6
    shift = np.zeros(d)
    shift[2] = 3.0
    f0 = blobs(rng, [40, 3], [np.zeros(d), shift])
    f1 = blobs(rng, [30], [np.ones(d)])
    features = np.concatenate([f0, f1])
    labels = np.array([0] * 43 + [1] * 30, np.int32)
    valid = np.ones(73, bool)
    keep, scores = jax.jit(filtering.spectral_signatures, static_argnums=(3, 4))(
        features, labels, valid, 2, 3
    )
    for c in (0, 1):
        rows = labels == c
        centred = features[rows].astype(np.float64)
        centred -= centred.mean(0)
        v = np.linalg.svd(centred)[2][0]
        np.testing.assert_allclose(scores[rows], (centred @ v) ** 2, rtol=1e-3)
    removed = np.flatnonzero(~np.asarray(keep))
    assert set(removed[removed < 43]) == {40, 41, 42}
    assert len(removed) == 6  # 3 per class: the 3 top outliers of class 1 too


def test_rank_in_class_and_removal_respect_valid_rows_and_class_sizes():
    scores = jnp.array([5.0, 1.0, 3.0, 9.0, 2.0, 7.0])
    labels = jnp.array([0, 0, 0, 1, 1, 0])
    valid = jnp.array([True, True, True, True, True, False])
    rank = filtering.rank_in_class(scores, labels, valid, 2)
    np.testing.assert_array_equal(rank[:5], [0, 2, 1, 0, 1])
    keep = filtering.remove_top_per_class(scores, labels, valid, 2, 5)
    # At most all but one row of a class; the invalid row is always kept.
    np.testing.assert_array_equal(keep, [False, True, False, False, True, True])


def test_activation_clustering_splits_two_separated_clusters():
    """Class 0 holds two far-apart clusters (30 + 8): 2-means splits them exactly
    and the smaller one (8/38 <= 0.35) is flagged; class 1 is one blob, whose
    split is about even, so nothing of it is flagged."""
    rng = np.random.default_rng(1)
    d = 12
    far = np.full(d, 4.0)
    f0 = blobs(rng, [30, 8], [np.zeros(d), far])
    f1 = blobs(rng, [40], [np.zeros(d)], scale=1.0)
    features = np.concatenate([f0, f1])
    labels = np.array([0] * 38 + [1] * 40, np.int32)
    valid = np.ones(78, bool)
    keep, fraction = jax.jit(filtering.activation_clustering, static_argnums=3)(
        features, labels, valid, 2
    )
    rows = np.arange(78)
    np.testing.assert_array_equal(~np.asarray(keep), (rows >= 30) & (rows < 38))
    np.testing.assert_allclose(fraction[30:38], 8 / 38, rtol=1e-6)


def test_deep_knn_removes_a_mislabelled_point_among_clean_neighbours():
    rng = np.random.default_rng(2)
    features = blobs(rng, [20, 20], [np.zeros(4), np.full(4, 5.0)])
    labels = np.array([0] * 20 + [1] * 20, np.int32)
    labels[3] = 1  # a class-1 label in the middle of class 0
    keep, plural = filtering.deep_knn(features, labels, np.ones(40, bool), 2, k=5)
    np.testing.assert_array_equal(np.flatnonzero(~np.asarray(keep)), [3])
    assert int(plural[3]) == 0


def test_knn_plurality_matches_a_looped_numpy_computation():
    """Random features and labels over 3 classes, a few invalid rows, blocks that
    do not divide the rows: equal to numpy per row (ties: smallest label)."""
    rng = np.random.default_rng(3)
    n, k = 23, 4
    features = rng.normal(size=(n, 3)).astype(np.float32)
    labels = rng.integers(0, 3, n).astype(np.int32)
    valid = rng.uniform(size=n) > 0.2
    got = filtering.knn_plurality(features, labels, valid, 3, k, block=5)
    for i in range(n):
        d = ((features - features[i]) ** 2).sum(1)
        d[~valid] = np.inf
        d[i] = np.inf
        nearest = np.argsort(d, kind="stable")[:k]
        expected = np.bincount(labels[nearest], minlength=3).argmax()
        assert int(got[i]) == expected, i


def test_filter_stats_count_poisons_and_clean_rows():
    keep = jnp.array([True, False, False, True, True, False])
    is_poison = jnp.array([False, True, False, True, False, False])
    valid = jnp.array([True, True, True, True, True, False])
    stats = filtering.filter_stats(keep, is_poison, valid)
    assert float(stats["poison_recall"]) == 0.5
    assert int(stats["clean_removed"]) == 1  # row 5 is not in the training set
    np.testing.assert_allclose(stats["clean_removed_fraction"], 1 / 3)


def _loss(params, x, y):
    h = jnp.tanh(x @ params["w1"])
    logits = h @ params["w2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def _params(key):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (5, 4)),
        "w2": jax.random.normal(k2, (4, 3)),
    }


def test_per_example_gradients_and_clipping_match_a_loop():
    """Vmapped per-example gradients equal jax.grad of each example's loss in a
    loop; after clipping every norm is at most C, and the private gradient without
    noise is the mean of the clipped looped gradients over the real rows (the
    zero-weight row left out)."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 6), jnp.int32)
    w = jnp.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    params = _params(jax.random.key(0))

    def example_loss(p, xi, yi):
        return _loss(p, xi[None], yi[None])[0], ()

    grads, _ = jax.jit(dtrain.per_example_gradients, static_argnums=0)(
        example_loss, params, x, y
    )
    one = jax.jit(jax.grad(lambda p, xi, yi: _loss(p, xi, yi)[0]))
    looped = [one(params, x[i : i + 1], y[i : i + 1]) for i in range(6)]
    for i in range(6):
        jax.tree.map(
            lambda a, b, i=i: np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-6),
            grads,
            looped[i],
        )
    clip = 0.2
    clipped, norms = dtrain.clip_per_example(grads, clip)
    assert float(norms.max()) > clip  # the test clips something
    assert float(dtrain.global_norms(clipped).max()) <= clip * (1 + 1e-5)
    private = dtrain.private_gradient(grads, w, jax.random.key(1), clip, 0.0)

    def clipped_loop(g):
        norm = np.sqrt(sum(float((leaf**2).sum()) for leaf in jax.tree.leaves(g)))
        return jax.tree.map(lambda leaf: leaf * min(1.0, clip / norm), g)

    expected = jax.tree.map(
        lambda *gs: sum(gs) / 5, *[clipped_loop(g) for g in looped[:5]]
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        private,
        expected,
    )


def test_private_gradient_noise_has_the_stated_scale():
    """Zero gradients: the output is the noise alone, std sigma * C / (real rows)."""
    grads = {"w": jnp.zeros((4, 10000))}
    weights = jnp.array([1.0, 1.0, 0.0, 1.0])
    out = dtrain.private_gradient(grads, weights, jax.random.key(2), 2.0, 0.5)
    np.testing.assert_allclose(np.std(out["w"]), 0.5 * 2.0 / 3, rtol=0.03)


def test_mixup_is_the_convex_combination_with_real_partners():
    images = jnp.arange(5 * 2 * 2 * 1, dtype=jnp.float32).reshape(5, 2, 2, 1)
    weights = jnp.array([1.0, 1.0, 1.0, 0.0, 0.0])
    mixed, partners, lam = dtrain.mixup(jax.random.key(3), images, weights, 1.0)
    assert 0.0 <= float(lam) <= 1.0
    assert set(np.asarray(partners[:3]).tolist()) == {0, 1, 2}  # real <-> real
    p = np.asarray(partners)
    expected = (
        float(lam) * np.asarray(images) + (1 - float(lam)) * np.asarray(images)[p]
    )
    np.testing.assert_allclose(mixed, expected, rtol=1e-6)
    loss, correct = dtrain.mixed_loss(
        lambda y: (y.sum().astype(jnp.float32), 1.0), jnp.arange(5), partners, 0.25
    )
    np.testing.assert_allclose(loss, 10.0)  # both label sets sum to 10
    np.testing.assert_allclose(correct, 1.0)


def test_cutout_zeroes_the_clipped_square():
    """Side 4: centred at the corner (0, 0) a 2 x 2 square survives the border;
    centred at (4, 5) the whole 4 x 4 square, rows 2..5 and columns 3..6."""
    corner = dtrain.cutout_mask((8, 8), 0, 0, 4)
    assert float(corner.sum()) == 4 and float(corner[:2, :2].sum()) == 4
    inside = dtrain.cutout_mask((8, 8), 4, 5, 4)
    expected = np.zeros((8, 8))
    expected[2:6, 3:7] = 1
    np.testing.assert_array_equal(inside, expected)
    images = jnp.ones((16, 8, 8, 3))
    out = dtrain.cutout(jax.random.key(5), images, 4)
    kept = np.asarray(out).sum(axis=(1, 2, 3)) / 3
    assert ((kept >= 64 - 16) & (kept <= 64 - 4)).all()  # 4..16 pixels cut
    assert np.isin(np.asarray(out), [0.0, 1.0]).all()


def _tiny_model() -> Model:
    """Mean-pooled pixels -> tanh layer -> 3 logits, as pure functions."""

    def forward(p, images):
        f = jnp.tanh(images.mean(axis=(1, 2)) @ p["w1"])
        return f @ p["head"]["w2"], f

    def apply(variables, images, train=False):
        del train
        return forward(variables["params"], images)

    def apply_train(variables, images):
        return apply(variables, images), {}

    def apply_head(head_vars, f, train=False):
        out = f @ head_vars["params"]["w2"]
        return (out, {}) if train else out

    def init(key):
        k1, k2 = jax.random.split(key)
        return {
            "params": {
                "w1": jax.random.normal(k1, (3, 4)),
                "head": {"w2": jax.random.normal(k2, (4, 3))},
            }
        }

    return Model(init, apply, apply_train, apply_head, "tiny", (4, 4, 3), 3)


def _tiny_data(n=6, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 4, 4, 3)).astype(np.uint8)
    labels = (np.arange(n) % 3).astype(np.int32)
    return images, labels


def test_dp_step_is_the_mean_of_looped_clipped_gradients():
    """One full-batch SGD step with clip C and no noise: params - lr * mean_i
    clip(grad of example i's loss), the gradients computed one example at a time."""
    model = _tiny_model()
    variables = model.init(jax.random.key(0))
    images, labels = _tiny_data()
    clip, lr = 0.05, 0.5
    config = TrainConfig(
        learning_rate=lr, momentum=0.0, batch_size=6, dp_clip_norm=clip
    )
    trained, _ = train(
        model, variables, make_train_data(images, labels), jax.random.key(1), config
    )
    x = images.astype(np.float32) / 255.0

    @jax.jit
    @jax.grad
    def one(p, xi, yi):
        logits, _ = model.apply({"params": p}, xi)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yi)[0]

    p0 = variables["params"]
    grads = [one(p0, x[i : i + 1], labels[i : i + 1]) for i in range(6)]
    norms = [
        np.sqrt(sum(float((g**2).sum()) for g in jax.tree.leaves(gi))) for gi in grads
    ]
    assert min(norms) > clip  # every example is clipped
    mean = jax.tree.map(
        lambda *gs: (
            sum(g * min(1.0, clip / n) for g, n in zip(gs, norms, strict=True)) / 6
        ),
        *grads,
    )
    expected = jax.tree.map(lambda w, g: w - lr * g, p0, mean)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        trained["params"],
        expected,
    )


def test_removed_rows_do_not_reach_the_victim():
    """Rows with weight 0 (a filter removed them): changing their images and labels
    leaves the trained victim unchanged, also under input mixup (they are never
    a partner); without the weights the change shows."""
    model = _tiny_model()
    variables = model.init(jax.random.key(0))
    images, labels = _tiny_data(12)
    weights = np.ones(12, np.float32)
    weights[[2, 7]] = 0.0
    other = images.copy()
    other[[2, 7]] = 255 - other[[2, 7]]
    other_labels = labels.copy()
    other_labels[[2, 7]] = (labels[[2, 7]] + 1) % 3
    config = TrainConfig(learning_rate=0.3, batch_size=4, input_mixup=1.0)
    runs = [
        train(
            model,
            variables,
            make_train_data(x, y)._replace(weights=weights),
            jax.random.key(1),
            config,
        )[0]
        for x, y in ((images, labels), (other, other_labels))
    ]
    jax.tree.map(np.testing.assert_array_equal, *runs)
    unweighted, _ = train(  # all weights 1 (one compiled program for the three)
        model,
        variables,
        make_train_data(other, other_labels)._replace(weights=np.ones(12, np.float32)),
        jax.random.key(1),
        config,
    )
    assert not np.allclose(unweighted["params"]["w1"], runs[0]["params"]["w1"])


def test_defence_options_are_checked():
    with pytest.raises(UserInputError, match="needs dp_clip_norm"):
        TrainConfig(dp_noise_multiplier=1.0)
    with pytest.raises(UserInputError, match="regulariser"):
        TrainConfig(dp_clip_norm=1.0, mixup=1.0)
    with pytest.raises(UserInputError, match=">= 0"):
        TrainConfig(cutout=-1)
