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


def project(features, n_probes: int) -> dict[str, np.ndarray]:
    """Fig. 3's 2-D view of (target, poisons, probes) features.

    `probes` are `n_probes` samples of the target class, then of the base class.
    x: position along the line from the target class's centroid (0) to the base
    class's (1); y: the largest remaining direction of the probes (first principal
    component of their residuals), in the same units.
    """
    target, poisons, probes = (np.asarray(f) for f in features)
    tc, bc = probes[:n_probes].mean(0), probes[n_probes:].mean(0)
    axis = bc - tc
    scale = float(axis @ axis)

    def coords(f):
        x = (f - tc) @ axis / scale
        return x, f - tc - x[:, None] * axis

    _, resid = coords(probes)
    _, _, vt = np.linalg.svd(resid - resid.mean(0), full_matrices=False)

    def xy(f):
        x, r = coords(f)
        return np.stack([x, r @ vt[0] / np.sqrt(scale)], -1)

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
