"""Training-set filters: the rows a defender removes before retraining.

Each filter is a pure function of ONE training set's representations (features
`(N, D)` of every training row, poisons swapped in, from the victim's penultimate
layer), its labels `(N,)` and a `valid` mask `(N,)` (rows that are in the training
set; the others are ignored and always kept), and returns the rows to keep,
`keep (N,) bool`. Class-wise statistics are masked sums over all rows, computed for
every class at once (`vmap` over classes), so a filter has static shapes, jits, and
vmaps over trials.

* `spectral_signatures` (Tran et al. 2018, Alg. 1): per class, the outlier score of
  each row is its squared projection on the top right singular vector of the
  class's centred representations; the `count` highest scores of every class are
  removed (Tran et al.: 1.5 x the defender's bound on the number of poisons).
* `activation_clustering` (Chen et al. 2018, Sec. 3-4): per class, the activations
  reduced to 10 dimensions (ICA in the paper), split into 2 clusters by k-means;
  the smaller cluster is flagged when its relative size is at most
  `size_threshold` (ART's relative-size analysis; 0.5 flags the smaller one always).
* `deep_knn` (Peri et al. 2020, Sec. 3): a row is removed when the plurality label
  of its k nearest neighbours (l2 in feature space, itself excluded) is not its
  own label.

`filter_stats` scores a keep mask against the rows that really are poisons.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpoison.victims.features import map_in_batches


def _class_masks(labels, valid, num_classes: int) -> jax.Array:
    """(K, N): row n is valid and of class k."""
    labels, valid = jnp.asarray(labels), jnp.asarray(valid)
    return (labels[None, :] == jnp.arange(num_classes)[:, None]) & valid[None, :]


def _centred(features, mask):
    """Rows of one class centred on the class mean; zero rows outside the class."""
    m = mask.astype(features.dtype)[:, None]
    mean = (features * m).sum(0) / jnp.maximum(m.sum(), 1.0)
    return (features - mean[None, :]) * m


def orthonormal_columns(a, floor: float = 1e-6) -> jax.Array:
    """The columns of `a` (n, k) made orthonormal in order (Gram-Schmidt, applied
    twice); a column (nearly) in the span of the previous ones, with norm below
    `floor` times the first column's, becomes 0. Pure XLA (no LAPACK)."""
    k = a.shape[1]
    first = jnp.maximum(jnp.linalg.norm(a[:, 0]), 1e-30)

    def body(j, q):
        v = q[:, j]
        earlier = (jnp.arange(k) < j).astype(q.dtype)
        for _ in range(2):  # "twice is enough" (Giraud et al. 2005)
            v = v - q @ ((q.T @ v) * earlier)
        norm = jnp.linalg.norm(v)
        return q.at[:, j].set(jnp.where(norm > floor * first, v / norm, 0.0))

    return jax.lax.fori_loop(0, k, body, a)


def top_eigenvectors(c, k: int, iterations: int = 200) -> jax.Array:
    """(d, k) orthonormal basis of the top-k eigenspace of the symmetric PSD
    matrix `c` (d, d) by orthogonal (subspace) iteration from a fixed start.

    Pure XLA on purpose: jaxlib's batched LAPACK eigh waited forever inside
    per-device programs on a multi-device CPU (its batch map blocks on the pool
    running it). For k = 1 this is power iteration; the subspace (not the basis
    inside it) converges at the rate lambda_{k+1} / lambda_k per iteration.
    """
    start = jax.random.normal(jax.random.key(0), (c.shape[0], k), c.dtype)

    def body(_, v):
        return orthonormal_columns(c @ v)

    return jax.lax.fori_loop(0, iterations, body, orthonormal_columns(start))


def spectral_scores(features, labels, valid, num_classes: int) -> jax.Array:
    """Tran et al. 2018, Alg. 1 (b)-(e): tau_i = ((R(x_i) - R_hat) . v)^2.

    R_hat is the mean representation of row i's class and v the top right singular
    vector of that class's centred representation matrix M (the top eigenvector of
    M^T M, which rows of other classes, zeroed, do not change). Invalid rows score 0.
    """
    f = jnp.asarray(features, jnp.float32)

    def one_class(mask):
        centred = _centred(f, mask)
        v = top_eigenvectors(centred.T @ centred, 1)[:, 0]
        return jnp.square(centred @ v)  # 0 outside the class

    scores = jax.vmap(one_class)(_class_masks(labels, valid, num_classes))
    return scores.sum(0)  # each valid row has its own class's score; others 0


def rank_in_class(scores, labels, valid, num_classes: int) -> jax.Array:
    """Each row's rank by descending score among the valid rows of its class (0 =
    highest; ties by row order); invalid rows rank behind every class."""
    n = scores.shape[0]
    group = jnp.where(valid, labels, num_classes)
    order = jnp.lexsort((-scores, group))  # by class, then by descending score
    grouped = group[order]
    first = jnp.searchsorted(grouped, grouped, side="left")
    return jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n) - first)


def remove_top_per_class(scores, labels, valid, num_classes: int, count) -> jax.Array:
    """Keep mask removing the `count` highest-scoring valid rows of every class
    (at most all but one row of a class). `count` may be traced."""
    masks = _class_masks(labels, valid, num_classes)
    sizes = masks.sum(1)[labels]
    limit = jnp.minimum(jnp.asarray(count), jnp.maximum(sizes - 1, 0))
    rank = rank_in_class(scores, labels, valid, num_classes)
    return ~(valid & (rank < limit))


def spectral_signatures(
    features, labels, valid, num_classes: int, count
) -> tuple[jax.Array, jax.Array]:
    """Tran et al. 2018, Alg. 1: remove the `count` top outlier scores per class.

    Args:
      features: (N, D) representations of the training rows.
      labels: (N,) the labels they are trained with.
      valid: (N,) bool, rows in the training set.
      num_classes: K.
      count: rows removed from each class; Tran et al. use 1.5 x epsilon, the
        defender's upper bound on the number of poisons (may be traced).

    Returns:
      (keep (N,) bool, scores (N,)).
    """
    scores = spectral_scores(features, labels, valid, num_classes)
    return remove_top_per_class(scores, labels, valid, num_classes, count), scores


def two_means(points, mask, init, iterations: int) -> jax.Array:
    """Lloyd's algorithm for 2-means over the rows `mask` of `points` (N, d).

    `init` (N,) bool is the first assignment (cluster 1); a cluster that empties
    keeps its previous centre. Returns the final assignment (False outside `mask`).
    """
    m = mask.astype(points.dtype)

    def centres(assign, previous):
        ones = m * assign
        zeros = m * (1.0 - assign)
        c1 = (points * ones[:, None]).sum(0) / jnp.maximum(ones.sum(), 1.0)
        c0 = (points * zeros[:, None]).sum(0) / jnp.maximum(zeros.sum(), 1.0)
        c1 = jnp.where(ones.sum() > 0, c1, previous[1])
        c0 = jnp.where(zeros.sum() > 0, c0, previous[0])
        return jnp.stack([c0, c1])

    def step(_, carry):
        assign, previous = carry
        c = centres(assign, previous)
        d = jnp.square(points[:, None, :] - c[None]).sum(-1)  # (N, 2)
        return (d[:, 1] < d[:, 0]).astype(points.dtype) * m, c

    start = init.astype(points.dtype) * m
    assign, _ = jax.lax.fori_loop(
        0, iterations, step, (start, jnp.zeros((2, points.shape[1]), points.dtype))
    )
    return assign > 0


def activation_clusters(
    features, mask, dims: int = 10, whiten: bool = True, iterations: int = 30
) -> jax.Array:
    """One class's 2-means split of its activations reduced to `dims` dimensions.

    Reduction: the coordinates of the centred activations in the class's top
    `dims` principal subspace (`top_eigenvectors`); `whiten` makes them
    uncorrelated with unit variance (Gram-Schmidt on the score columns). Chen et
    al. reduce with FastICA, whose sources are whitened principal components times
    an orthogonal unmixing matrix; k-means depends only on distances, which a
    rotation keeps, so 2-means on any whitened coordinates of the subspace splits
    as on the ICA sources (the start below does not depend on the rotation).
    `whiten=False` is ART's PCA reduction (also basis-free within the subspace).

    Start: the sign of each row's first principal component score (principal
    direction divisive partitioning, Boley 1998), a deterministic 2-means start.

    Returns:
      (N,) bool, the rows of cluster 1 (False outside `mask`).
    """
    f = jnp.asarray(features, jnp.float32)
    centred = _centred(f, mask)
    cov = centred.T @ centred
    scores = centred @ top_eigenvectors(cov, min(dims, f.shape[1]))
    first = centred @ top_eigenvectors(cov, 1)[:, 0]
    if whiten:  # unit variance, uncorrelated: Z^T Z = n I over the class's rows
        n = jnp.maximum(mask.sum(), 1).astype(jnp.float32)
        scores = orthonormal_columns(scores) * jnp.sqrt(n)
    return two_means(scores, mask, first > 0, iterations)


def activation_clustering(
    features,
    labels,
    valid,
    num_classes: int,
    dims: int = 10,
    size_threshold: float = 0.35,
    whiten: bool = True,
    iterations: int = 30,
) -> tuple[jax.Array, jax.Array]:
    """Chen et al. 2018: per class, 2-means on the reduced activations; the smaller
    cluster is removed if it holds at most `size_threshold` of its class.

    Returns:
      (keep (N,) bool, relative size (N,) of each row's cluster within its class).
    """

    def one_class(mask):
        ones = activation_clusters(features, mask, dims, whiten, iterations)
        size = jnp.maximum(mask.sum(), 1)
        frac1 = (ones & mask).sum() / size
        frac = jnp.where(ones, frac1, 1.0 - frac1)
        smaller = jnp.where(frac1 < 0.5, ones, ~ones & mask)
        flagged = mask & smaller & (jnp.minimum(frac1, 1.0 - frac1) <= size_threshold)
        return flagged, jnp.where(mask, frac, 0.0)

    flagged, fraction = jax.vmap(one_class)(_class_masks(labels, valid, num_classes))
    return ~flagged.any(0), fraction.sum(0)


def knn_plurality(
    features, labels, valid, num_classes: int, k: int, block: int = 256
) -> jax.Array:
    """The plurality label among each row's k nearest valid rows (squared l2 in
    feature space, the row itself excluded); ties go to the smallest label."""
    f = jnp.asarray(features, jnp.float32)
    labels, valid = jnp.asarray(labels), jnp.asarray(valid)
    n = f.shape[0]
    norms = jnp.square(f).sum(1)
    rows = jnp.arange(n)

    def plurality(args):
        fb, ib = args
        d = norms[ib][:, None] + norms[None, :] - 2.0 * fb @ f.T
        usable = valid[None, :] & (rows[None, :] != ib[:, None])
        d = jnp.where(usable, d, jnp.inf)
        neg, nearest = jax.lax.top_k(-d, k)
        votes = jax.nn.one_hot(labels[nearest], num_classes)
        votes = votes * jnp.isfinite(neg)[..., None]  # fewer than k usable rows
        return jnp.argmax(votes.sum(1), -1)

    both = jnp.concatenate([f, rows[:, None].astype(f.dtype)], axis=1)
    return map_in_batches(
        lambda c: plurality((c[:, :-1], c[:, -1].astype(jnp.int32))), both, block
    )


def deep_knn(
    features, labels, valid, num_classes: int, k: int
) -> tuple[jax.Array, jax.Array]:
    """Peri et al. 2020: remove the rows whose label is not the plurality label of
    their k nearest neighbours in feature space (`k` static).

    Returns:
      (keep (N,) bool, plurality label (N,)).
    """
    plural = knn_plurality(features, labels, valid, num_classes, k)
    return ~valid | (plural == labels), plural


def filter_stats(keep, is_poison, valid) -> dict[str, jax.Array]:
    """What a filter removed: `poison_recall` (removed poisons / poisons; 0 with
    none), `poisons_removed`, `clean_removed` (valid clean rows removed) and
    `clean_removed_fraction` (of the valid clean rows)."""
    removed = valid & ~keep
    poisons = valid & is_poison
    clean = valid & ~is_poison
    poisons_removed = (removed & poisons).sum()
    clean_removed = (removed & clean).sum()
    return {
        "poison_recall": poisons_removed / jnp.maximum(poisons.sum(), 1),
        "poisons_removed": poisons_removed,
        "clean_removed": clean_removed,
        "clean_removed_fraction": clean_removed / jnp.maximum(clean.sum(), 1),
    }
