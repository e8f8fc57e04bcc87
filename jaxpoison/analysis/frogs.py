"""Poison Frogs' analyses (Shafahi et al. 2018): how far a poison turns the victim's
decision boundary (Sec. 4.1.1), where target, poisons and classes sit in feature
space (Fig. 3), and which targets are outliers (Sec. 4.2).

Kernels are a Dense layer's, (..., D, K): one column per class, the "row" w_c of
class c in the paper's notation. Functions of arrays are jit/vmap-compatible.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxpoison.errors import UserInputError


def angle_degrees(u: jax.Array, v: jax.Array) -> jax.Array:
    """Angle between vectors `u` and `v` (last axis; leading axes batch), degrees."""
    norms = jnp.linalg.norm(u, axis=-1) * jnp.linalg.norm(v, axis=-1)
    cos = jnp.sum(u * v, axis=-1) / norms
    return jnp.degrees(jnp.arccos(jnp.clip(cos, -1.0, 1.0)))


def class_row(kernel: jax.Array, c: jax.Array) -> jax.Array:
    """Row `c` (per leading index) of kernels (..., D, K): shape (..., D)."""
    return jnp.take_along_axis(kernel, c[..., None, None], axis=-1)[..., 0]


def boundary_vector(kernel: jax.Array, base: jax.Array) -> jax.Array:
    """The last-layer weight vector whose rotation the angular deviation measures.

    `kernel` is (..., D, K), `base` (...,) the base class. Two classes: `w_1 -
    w_0`, the normal of the decision boundary; more: `w_base`, the base class's row.
    """
    if kernel.shape[-1] == 2:
        return kernel[..., 1] - kernel[..., 0]
    return class_row(kernel, base)


def head_kernel(heads) -> jax.Array:
    """The one Dense kernel of a linear head's variables."""
    leaves = [
        x
        for path, x in jax.tree_util.tree_leaves_with_path(heads)
        if "kernel" in jax.tree_util.keystr(path)
    ]
    if len(leaves) != 1:
        raise ValueError(f"expected one kernel in the head, found {len(leaves)}")
    return leaves[0]


def boundary_angles(poisoned, clean, other, base, target) -> dict[str, jax.Array]:
    """The angular deviation of Sec. 4.1.1 between victims' kernels (..., D, K).

    Returns `angle_deg` (poisoned vs clean victim, `boundary_vector`),
    `pair_angle_deg` (the same for the (base - target) row difference, the
    boundary between the two classes involved) and `seed_angle_deg` (a clean
    victim of another seed, `other`, vs the clean one: how far the boundary turns
    with no poison at all). Biases are left out.
    """

    def pair(k):
        return class_row(k, base) - class_row(k, target)

    return {
        "angle_deg": angle_degrees(
            boundary_vector(poisoned, base), boundary_vector(clean, base)
        ),
        "pair_angle_deg": angle_degrees(pair(poisoned), pair(clean)),
        "seed_angle_deg": angle_degrees(
            boundary_vector(other, base), boundary_vector(clean, base)
        ),
    }


def projection_axes(mu_target, mu_base, theta) -> tuple[np.ndarray, np.ndarray]:
    """Fig. 3's two unit axes (Shafahi et al. 2018): e1 along u = mu_base -
    mu_target, e2 the part of the last layer's weight vector `theta` orthogonal to
    u (Gram-Schmidt), so (e1, e2) spans the plane of u and theta, e2 towards theta."""
    u = np.asarray(mu_base, np.float64) - np.asarray(mu_target, np.float64)
    e1 = u / np.linalg.norm(u)
    w = np.asarray(theta, np.float64)
    w = w - (w @ e1) * e1
    return e1, w / np.linalg.norm(w)


def project(features, n_probes: int, theta) -> dict[str, np.ndarray]:
    """Fig. 3's 2-D view of (target, poisons, probes) features.

    `probes` are `n_probes` samples of the target class, then of the base class;
    their centroids are mu_target and mu_base. x: the component along u = mu_base -
    mu_target, y: along the part of `theta` orthogonal to u (`projection_axes`);
    both measured from mu_target in units of |u|, so the target class's centroid
    sits at (0, 0) and the base class's at (1, 0).
    """
    target, poisons, probes = (np.asarray(f, np.float64) for f in features)
    mu_t, mu_b = probes[:n_probes].mean(0), probes[n_probes:].mean(0)
    e1, e2 = projection_axes(mu_t, mu_b, theta)
    scale = np.linalg.norm(mu_b - mu_t)

    def xy(f):
        return np.stack([(f - mu_t) @ e1, (f - mu_t) @ e2], -1) / scale

    return {
        "target": xy(target[None]),
        "poisons": xy(poisons),
        "target_class": xy(probes[:n_probes]),
        "base_class": xy(probes[n_probes:]),
    }


def select_targets(probs, labels, candidates, target_class, n, selection, rng):
    """Rows of `target_class` among `candidates` that the model (class
    probabilities `probs`) classifies correctly: `n` at random (sorted), or the
    `n` with the lowest confidence ("outlier", Sec. 4.2's outlier targets)."""
    rows = candidates[
        (labels[candidates] == target_class)
        & (probs[candidates].argmax(-1) == target_class)
    ]
    if n > len(rows):
        raise UserInputError(
            f"{n} targets asked, only {len(rows)} test images of class "
            f"{target_class} are classified correctly"
        )
    if selection == "outlier":
        return rows[np.argsort(probs[rows, target_class], kind="stable")[:n]]
    return np.sort(rng.choice(rows, n, replace=False))
