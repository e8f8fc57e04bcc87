"""Training-time defences as pure pieces of the victim's training step.

* DP-SGD-style gradient shaping (Hong et al. 2020, after Abadi et al. 2016, Alg. 1):
  every example's gradient is clipped to l2 norm at most C, the clipped gradients
  are summed, Gaussian noise N(0, (sigma C)^2 I) is added and the sum divided by
  the number of examples in the batch (`private_gradient`). Each example's
  gradient is that of its own loss computed alone (`per_example_gradients`, one
  vmapped backward pass for the batch); the trainer runs BatchNorm on its running
  statistics under DP, frozen, so that no example's gradient depends on the
  others' (train-mode BatchNorm couples a batch; Opacus refuses it for that
  reason).
* Strong augmentation (Borgnia et al. 2021): input mixup (Zhang et al. 2018):
  x~ = lam x + (1 - lam) x[perm], lam ~ Beta(a, a) once per batch, loss
  lam CE(y) + (1 - lam) CE(y[perm]) (`mixup`, `mixed_loss`); cutout (DeVries &
  Taylor 2017): a square of side s at a uniformly random centre, clipped at the
  border, set to 0 (`cutout`).

The victim trainer (victims/train.py) applies them when its `TrainConfig` asks
(`dp_clip_norm`, `dp_noise_multiplier`, `input_mixup`, `cutout`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpoison.victims.regularizers import mixup_partners


def per_example_gradients(example_loss, params, *examples):
    """Each example's gradient of its own loss: `jax.vmap` of `jax.grad` over the
    leading axis of `examples` (None leaves are shared).

    `example_loss(params, *one_example) -> (loss, aux)`. Returns (grads, aux),
    every leaf with the leading (B,) axis.
    """
    grad_fn = jax.grad(example_loss, has_aux=True)
    return jax.vmap(grad_fn, in_axes=(None, *[0] * len(examples)))(params, *examples)


def global_norms(tree) -> jax.Array:
    """(B,) l2 norm of each example's gradient over every leaf of `tree`."""
    squares = [
        jnp.square(leaf.reshape(leaf.shape[0], -1)).sum(1)
        for leaf in jax.tree.leaves(tree)
    ]
    return jnp.sqrt(sum(squares))


def clip_per_example(tree, clip_norm: float):
    """Each example's gradient scaled to norm at most `clip_norm`: g * min(1, C/|g|).

    Returns (clipped tree, the norms before clipping)."""
    norms = global_norms(tree)
    factor = jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-12))

    def scale(leaf):
        return leaf * factor.reshape(-1, *([1] * (leaf.ndim - 1))).astype(leaf.dtype)

    return jax.tree.map(scale, tree), norms


def private_gradient(grads, weights, key, clip_norm: float, noise_multiplier: float):
    """Abadi et al. 2016, Alg. 1: (sum_i w_i clip(g_i) + N(0, sigma^2 C^2)) / sum w.

    Args:
      grads: per-example gradients, leading axis (B,).
      weights: (B,) 0/1, the examples of the batch (padding and removed rows 0).
      key: PRNG key of the noise.
      clip_norm: C.
      noise_multiplier: sigma (0 = clipping only).
    """
    clipped, _ = clip_per_example(grads, clip_norm)
    leaves, treedef = jax.tree.flatten(clipped)
    keys = jax.random.split(key, len(leaves))
    count = jnp.maximum(weights.sum(), 1.0)

    def one(leaf, k):
        total = jnp.tensordot(weights.astype(leaf.dtype), leaf, axes=1)
        noise = jax.random.normal(k, total.shape, total.dtype)
        return (total + noise_multiplier * clip_norm * noise) / count

    return treedef.unflatten(
        [one(leaf, k) for leaf, k in zip(leaves, keys, strict=True)]
    )


def mixup_pairs(key, weights, alpha: float, dtype=jnp.float32):
    """A batch's input-mixup draw (Zhang et al. 2018): partners (B,) and one
    lam ~ Beta(alpha, alpha). Real rows (weight > 0) are paired only with real
    rows (`mixup_partners`), so padding and rows a filter removed never enter."""
    k_lam, k_perm = jax.random.split(key)
    lam = jax.random.beta(k_lam, alpha, alpha).astype(dtype)
    return mixup_partners(k_perm, weights), lam


def mix_images(images, partners, lam):
    """lam * x + (1 - lam) * x[partners]."""
    return lam * images + (1.0 - lam) * images[partners]


def mixup(key, images, weights, alpha: float):
    """Input mixup of a batch: (mixed images, partners, lam) (`mixup_pairs`)."""
    partners, lam = mixup_pairs(key, weights, alpha, images.dtype)
    return mix_images(images, partners, lam), partners, lam


def mixed_loss(loss_of_labels, labels, partners, lam):
    """lam * L(y) + (1 - lam) * L(y[partners]) for `loss_of_labels(y) -> (loss,
    correct)`; the correct count is mixed the same way."""
    loss_a, correct_a = loss_of_labels(labels)
    loss_b, correct_b = loss_of_labels(labels[partners])
    return (
        lam * loss_a + (1.0 - lam) * loss_b,
        lam * correct_a + (1.0 - lam) * correct_b,
    )


def cutout_mask(shape, centre_y, centre_x, size: int) -> jax.Array:
    """(H, W) mask, 1 on rows [cy - s//2, cy + s - s//2) x the same in columns,
    clipped at the border (DeVries & Taylor 2017's square)."""
    h, w = shape
    top, left = centre_y - size // 2, centre_x - size // 2
    ys = jax.lax.broadcasted_iota(jnp.int32, (h, w), 0)
    xs = jax.lax.broadcasted_iota(jnp.int32, (h, w), 1)
    inside = (ys >= top) & (ys < top + size) & (xs >= left) & (xs < left + size)
    return inside.astype(jnp.float32)


def cutout(key, images, size: int):
    """Cutout (DeVries & Taylor 2017): per image, a `size` x `size` square centred
    uniformly at random over the image (so it may stick out) set to 0."""
    n, h, w = images.shape[:3]
    ky, kx = jax.random.split(key)
    cy = jax.random.randint(ky, (n,), 0, h)
    cx = jax.random.randint(kx, (n,), 0, w)
    masks = jax.vmap(lambda y, x: cutout_mask((h, w), y, x, size))(cy, cx)
    return images * (1.0 - masks[..., None]).astype(images.dtype)
