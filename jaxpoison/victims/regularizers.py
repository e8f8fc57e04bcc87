"""Victim-side regularisers of Truong et al. 2020 as pure, weighted loss terms.

Truong et al. 2020 ("Systematic Evaluation of Backdoor Data Poisoning Attacks on
Image Classifiers", Sec. 3.4) train victims with one of four regularisers added to
the cross-entropy, to see whether they blunt a backdoor:

* logit squeezing: the l2 norm of the logits (Kannan et al. 2018);
* manifold mixup on the penultimate features (Verma et al. 2019), mixing weight
  lambda ~ U(0, 1) (Beta(1, 1));
* contrastive loss (their Eq. 4-5) on pairs of penultimate features: same-label
  pairs are pulled together, other pairs pushed beyond a margin c, as printed
  (unsquared distances, weights 1/n and (n-1)/n); Hadsell et al. 2006's squared
  form is kept beside it as `hadsell_contrastive_loss`;
* soft-nearest-neighbour loss (their Eq. 6, Frosst et al. 2019) at temperature T.

Every function takes per-example `weights`: the trainer pads its last batch with
zero-weight rows (repeats of real rows), and those rows must not count, neither as
an example nor as the partner of a pair. Weights are 0/1 masks; a pair (i, j)
counts with weight w_i * w_j.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def logit_squeezing(logits: jax.Array, weights: jax.Array) -> jax.Array:
    """Weighted mean over the batch of ||logits_i||_2 (Kannan et al. 2018)."""
    sq = jnp.sum(jnp.square(logits), axis=-1)
    # sqrt has an infinite derivative at 0: all-zero logits (a zero-initialised
    # head) would give NaN gradients, so differentiate sqrt only where sq > 0.
    safe = jnp.where(sq > 0, sq, 1.0)
    norms = jnp.where(sq > 0, jnp.sqrt(safe), 0.0)
    return jnp.sum(weights * norms) / jnp.maximum(weights.sum(), 1.0)


def pairwise_sq_distances(features: jax.Array) -> jax.Array:
    """||f_i - f_j||^2 for all pairs, (B, B), computed from differences (exact 0 on
    the diagonal and for duplicate rows, unlike the |a|^2 + |b|^2 - 2ab form)."""
    diff = features[:, None, :] - features[None, :, :]
    return jnp.sum(jnp.square(diff), axis=-1)


def _pair_mask(weights: jax.Array) -> jax.Array:
    """w_i * w_j for i != j: the pairs of distinct real examples."""
    b = weights.shape[0]
    return weights[:, None] * weights[None, :] * (1.0 - jnp.eye(b, dtype=weights.dtype))


def pairwise_distances(features: jax.Array) -> jax.Array:
    """||f_i - f_j||_2 for all pairs, (B, B), with gradient 0 where the distance is 0.

    sqrt has an infinite derivative at 0 (the diagonal, duplicate rows): there the
    norm's subgradient 0 is taken, so a same-label pair of identical features
    neither gives NaN nor pushes anything.
    """
    d2 = pairwise_sq_distances(features)
    safe = jnp.where(d2 > 0, d2, 1.0)
    return jnp.where(d2 > 0, jnp.sqrt(safe), 0.0)


def _pair_mean(per_pair: jax.Array, weights: jax.Array) -> jax.Array:
    """Mean of a (B, B) per-pair term over the ordered pairs i != j of real rows."""
    mask = _pair_mask(weights)
    return jnp.sum(mask * per_pair) / jnp.maximum(mask.sum(), 1.0)


def contrastive_loss(
    features: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    margin: float,
    num_classes: int,
) -> jax.Array:
    """Contrastive loss over the pairs of a batch, Truong et al. Eq. 4-5 as printed.

    For a pair (x, x') with features h and distance d = ||h(x) - h(x')||_2:

        l(x, x') = (1/n) d                      if y = y'   (Eq. 4)
                 = ((n-1)/n) max(0, c - d)      otherwise   (Eq. 5)

    with the distance itself, not squared (Hadsell et al.'s squared form is
    `hadsell_contrastive_loss`). How n is read: the paper does not define it
    beside the equations; we read n as the number of classes, so that 1/n and
    (n-1)/n are the shares of same-class and other-class pairs among pairs drawn
    from n balanced classes (`num_classes`, the model's class count: 10 for
    CIFAR-10, 5 for flowers). The batch's loss is the mean of l over the ordered
    pairs i != j of real (weight 1) examples.
    """
    n = float(num_classes)
    d = pairwise_distances(features)
    same = labels[:, None] == labels[None, :]
    per_pair = jnp.where(same, d / n, (n - 1.0) / n * jnp.maximum(margin - d, 0.0))
    return _pair_mean(per_pair, weights)


def hadsell_contrastive_loss(
    features: jax.Array, labels: jax.Array, weights: jax.Array, margin: float
) -> jax.Array:
    """Hadsell et al. 2006's squared contrastive loss over the pairs of a batch.

    `d^2` for same-label pairs and `max(0, c - d)^2` for other pairs, averaged
    over the ordered pairs i != j of real examples, without Truong et al.'s 1/n
    weights (their Eq. 4-5 as printed are `contrastive_loss`).
    """
    d2 = pairwise_sq_distances(features)
    d = pairwise_distances(features)  # where d = 0, max(0, c - d)^2 = c^2: grad 0
    same = labels[:, None] == labels[None, :]
    per_pair = jnp.where(same, d2, jnp.square(jnp.maximum(margin - d, 0.0)))
    return _pair_mean(per_pair, weights)


def soft_nearest_neighbor_loss(
    features: jax.Array, labels: jax.Array, weights: jax.Array, temperature: float
) -> jax.Array:
    """Soft-nearest-neighbour loss (Frosst et al. 2019; Truong et al. Eq. 6).

        l_sn = -1/b sum_i log( sum_{j != i, y_j = y_i} exp(-||f_i - f_j||^2 / T)
                              / sum_{k != i} exp(-||f_i - f_k||^2 / T) )

    over the real examples i that have at least one same-label partner j in the
    batch (for the others the fraction is 0 and the log undefined; Frosst et al.'s
    code adds 1e-5 inside the log, which only adds a constant for them). Computed
    with log-sum-exp, so small temperatures do not underflow.
    """
    logits = -pairwise_sq_distances(features) / temperature
    pairs = _pair_mask(weights) > 0
    same = (labels[:, None] == labels[None, :]) & pairs
    neg_inf = jnp.finfo(logits.dtype).min
    log_num = jax.nn.logsumexp(jnp.where(same, logits, neg_inf), axis=1)
    log_den = jax.nn.logsumexp(jnp.where(pairs, logits, neg_inf), axis=1)
    has_partner = same.any(axis=1)
    per_example = jnp.where(has_partner, log_den - log_num, 0.0)
    count = jnp.maximum(jnp.sum(has_partner), 1)
    return jnp.sum(per_example) / count


def mixup_partners(key: jax.Array, weights: jax.Array) -> jax.Array:
    """A random permutation of the batch that maps real rows to real rows.

    `perm[i]` is the row example i is mixed with ("a shuffled copy of the batch");
    zero-weight padding rows are mixed only among themselves. Two independent random
    orderings put the real rows first; the k-th real row of one is paired with the
    k-th of the other, a uniform random permutation of the real rows.
    """
    k1, k2 = jax.random.split(key)
    b = weights.shape[0]
    real = weights > 0
    order_a = jnp.argsort(jnp.where(real, jax.random.uniform(k1, (b,)), 2.0))
    order_b = jnp.argsort(jnp.where(real, jax.random.uniform(k2, (b,)), 2.0))
    return jnp.zeros(b, order_a.dtype).at[order_a].set(order_b)


def manifold_mixup_loss(
    head_fn,
    features: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    key: jax.Array,
):
    """Manifold mixup on the penultimate features (Verma et al. 2019).

    The batch's features are mixed with those of a shuffled copy, `lam * f +
    (1 - lam) * f[perm]`, with one `lam ~ U(0, 1)` per batch (Truong et al.); the
    loss is the cross-entropy of the head's logits on the mixed features against
    the labels mixed the same way, `lam * CE(y) + (1 - lam) * CE(y[perm])`.

    Args:
      head_fn: `head_fn(features) -> (logits, aux)`, the classification head.
      features, labels, weights: the batch's (B, D) features, labels and weights.
      key: PRNG key for `lam` and the permutation.

    Returns:
      (loss, aux): the weighted mean loss and what `head_fn` returned beside the
      logits (e.g. BatchNorm statistics of the head).
    """
    k_lam, k_perm = jax.random.split(key)
    lam = jax.random.uniform(k_lam, (), features.dtype)
    perm = mixup_partners(k_perm, weights)
    mixed = lam * features + (1.0 - lam) * features[perm]
    logits, aux = head_fn(mixed)
    ce_a = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    ce_b = optax.softmax_cross_entropy_with_integer_labels(logits, labels[perm])
    per_example = lam * ce_a + (1.0 - lam) * ce_b
    return jnp.sum(weights * per_example) / jnp.maximum(weights.sum(), 1.0), aux
