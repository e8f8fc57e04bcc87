"""Analyses as the papers define them: Poison Frogs' angular deviation, Fig. 3
projection and outlier targets; Truong et al.'s tables from grid rows."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpoison import UserInputError
from jaxpoison.analysis import backdoor_tables as bt
from jaxpoison.analysis import frogs


def test_angle_degrees_against_hand_computed_angles():
    u = jnp.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 2.0, 2.0], [3.0, 4.0, 0.0]])
    v = jnp.array(
        [[1.0, 1.0, 0.0], [-2.0, 0.0, 0.0], [2.0, 4.0, 4.0], [4.0, -3.0, 0.0]]
    )
    # 45 deg; opposite; parallel (different lengths); perpendicular.
    np.testing.assert_allclose(
        frogs.angle_degrees(u, v), [45.0, 180.0, 0.0, 90.0], atol=1e-3
    )
    # cos = (1*1 + 2*0 + 2*1) / (3 * sqrt(2)) = 1 / sqrt(2): 45 deg.
    np.testing.assert_allclose(
        frogs.angle_degrees(jnp.array([1.0, 2.0, 2.0]), jnp.array([1.0, 0.0, 1.0])),
        45.0,
        atol=1e-3,
    )


def test_boundary_vector_two_class_difference_and_base_row():
    # Dense kernels are (features, classes): columns are the class rows w_c.
    clean = jnp.array([[1.0, 0.0], [0.0, 1.0]])  # w1 - w0 = (-1, 1)
    poisoned = jnp.array([[1.0, 1.0], [0.0, 1.0]])  # w1 - w0 = (0, 1)
    base = jnp.array(0)
    np.testing.assert_allclose(frogs.boundary_vector(clean, base), [-1.0, 1.0])
    angle = frogs.angle_degrees(
        frogs.boundary_vector(poisoned, base), frogs.boundary_vector(clean, base)
    )
    np.testing.assert_allclose(angle, 45.0, atol=1e-3)
    # Three classes: the base class's row; batched over trials.
    kernels = jnp.arange(2 * 2 * 3, dtype=jnp.float32).reshape(2, 2, 3)
    rows = frogs.boundary_vector(kernels, jnp.array([2, 0]))
    np.testing.assert_allclose(rows, [[2.0, 5.0], [6.0, 9.0]])


def test_boundary_angles_of_three_class_kernels():
    # Columns w_0 = (1, 0), w_1 = (0, 1), w_2 = (1, 1); base 1, target 0. The
    # poisoned victim's w_1 turns to (1, 1): 45 deg, and w_1 - w_0 from (-1, 1)
    # to (0, 1): 45 deg too. The "other seed" is the clean victim: 0 deg.
    clean = jnp.array([[[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]])
    poisoned = jnp.array([[[1.0, 1.0, 1.0], [0.0, 1.0, 1.0]]])
    angles = frogs.boundary_angles(
        poisoned, clean, clean, jnp.array([1]), jnp.array([0])
    )
    np.testing.assert_allclose(angles["angle_deg"], [45.0], atol=1e-3)
    np.testing.assert_allclose(angles["pair_angle_deg"], [45.0], atol=1e-3)
    np.testing.assert_allclose(angles["seed_angle_deg"], [0.0], atol=1e-2)
    assert frogs.head_kernel({"params": {"kernel": clean, "bias": 0}}) is clean
    with pytest.raises(ValueError, match="one kernel"):
        frogs.head_kernel({"a": {"kernel": clean}, "b": {"kernel": clean}})


def test_projection_matches_a_hand_computed_case():
    """Features in R^3: target class at (0,0,0) +- (0,0,1), base class at
    (2,0,0) +- (0,0,1), so u = (2,0,0); theta = (1,1,5) leaves (0,1,5) orthogonal
    to u, e2 = (0,1,5)/sqrt(26). A point f = (1,3,5): x = 1/2, y = (3 + 25) /
    sqrt(26) / 2 (in units of |u| = 2)."""
    probes = np.array([[0, 0, 1], [0, 0, -1], [2, 0, 1], [2, 0, -1]], dtype=np.float64)
    f = np.array([1.0, 3.0, 5.0])
    pts = frogs.project((f, np.stack([f, -f]), probes), 2, np.array([1.0, 1.0, 5.0]))
    y = 28 / np.sqrt(26) / 2
    np.testing.assert_allclose(pts["target"], [[0.5, y]])
    np.testing.assert_allclose(pts["poisons"], [[0.5, y], [-0.5, -y]])
    # Probes at +-(0,0,1): y = +-5/sqrt(26)/2; centroids at (0, 0) and (1, 0).
    z = 5 / np.sqrt(26) / 2
    np.testing.assert_allclose(pts["target_class"], [[0, z], [0, -z]], atol=1e-12)
    np.testing.assert_allclose(pts["base_class"], [[1, z], [1, -z]], atol=1e-12)


def test_outlier_targets_are_the_least_confident_correct_ones():
    labels = np.array([0, 0, 0, 0, 1])
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.4, 0.6], [0.7, 0.3], [0.2, 0.8]])
    rows = np.arange(5)
    rng = np.random.default_rng(0)
    # Row 2 is misclassified; of 0, 1, 3 the least confident are 1 then 3.
    np.testing.assert_array_equal(
        frogs.select_targets(probs, labels, rows, 0, 2, "outlier", rng), [1, 3]
    )
    picked = frogs.select_targets(probs, labels, rows, 0, 3, "random", rng)
    np.testing.assert_array_equal(picked, [0, 1, 3])
    with pytest.raises(UserInputError, match="only 3"):
        frogs.select_targets(probs, labels, rows, 0, 4, "random", rng)


def grid_row(trigger, alpha, rate, seed, asr, clean, strategy="many_to_one"):
    metrics = {
        "asr": asr,
        "clean_val_accuracy": clean,
        "poisoned_val_accuracy": clean,
        "adversarial_clean_accuracy": clean,
    }
    return {
        "dataset": "d",
        "trigger": trigger,
        "alpha": alpha,
        "rate": rate,
        "strategy": strategy,
        "regularizer": "none",
        "seed": seed,
        "epochs_run": 3,
        "n_poisons": int(100 * rate),
        **{f"{k}_before": v for k, v in metrics.items()},
        **{f"{k}_after": v / 2 for k, v in metrics.items()},
    }


def test_tables_average_seeds_into_the_papers_tables_and_curves():
    rows = [
        grid_row("sine", 0.1, 0.1, 0, asr=0.8, clean=0.9),
        grid_row("sine", 0.1, 0.1, 1, asr=0.6, clean=0.7),
        grid_row("sine", 0.1, 0.0, 0, asr=0.1, clean=0.95),
        grid_row("sine", 0.5, 0.1, 0, asr=1.0, clean=0.9),
    ]
    tab = bt.tables(rows, 0.1, {"sine": 0.1}, ["none"], ["sine"])["d"]
    t2 = tab["table2_triggers"]["sine"]
    assert t2["asr"] == {"mean": pytest.approx(0.7), "std": pytest.approx(0.1), "n": 2}
    assert t2["clean_victim"]["asr_before"]["mean"] == pytest.approx(0.1)
    assert tab["table3_strategy"]["sine"]["one_to_one"] is None
    assert sorted(tab["alpha_curve"]["sine"]) == [0.1, 0.5]
    assert sorted(tab["rate_curve"]["sine"]) == [0.0, 0.1]
    assert (
        tab["table4_regularizers"]["none"]["sine"] is tab["table5_finetuning"]["sine"]
    )
    trends = bt.our_trends({"d": tab})["d"]
    assert trends["success_varies"] == "ASR by trigger: sine 70.0%"
    assert trends["fine_tuning"].startswith(
        "ASR before -> after fine-tuning: sine 70.0% -> 35.0%"
    )
    text = bt.markdown({"d": tab}, {"d": trends})
    assert "| sine | 0.1 | 70.0 +- 10.0 |" in text
    assert "| trigger | many-to-one | one-to-one |\n| --- | --- | --- |" in text
    assert "- regularisation: paper: " in text and "Ours: not run." in text
