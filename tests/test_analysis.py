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


def test_asr_counts_read_a_confusion_matrix_by_hand():
    # 3 classes; rows true, columns predicted. Towards t = 2 from every other
    # class: (1 + 3) of (4 + 5) images; from class 0 alone: 1 of 4.
    conf = [[2, 1, 1], [0, 2, 3], [0, 0, 7]]
    assert bt.asr_counts(conf, 2) == (4, 9)
    assert bt.asr_counts(conf, 2, source=0) == (1, 4)
    assert bt.asr_counts(conf, 0) == (0, 12)


def test_mean_ci_is_the_student_t_interval():
    # 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.302653: half width 4.302653 / sqrt 3.
    got = bt.mean_ci([1.0, 2.0, 3.0])
    half = 4.302653 / np.sqrt(3)
    assert got["mean"] == 2.0 and got["n"] == 3
    assert got["ci95_low"] == pytest.approx(2 - half, rel=1e-6)
    assert got["ci95_high"] == pytest.approx(2 + half, rel=1e-6)
    assert bt.mean_ci([0.5])["ci95_low"] is None


class GridConfig:
    rate = 0.1
    triggers = {"sine": 0.1}
    regularizer_triggers = ("sine",)
    curve_class = {"d": 1}
    one_to_one_offset = 1


def clean_row(seed, hits):
    """A clean victim on 3 classes whose triggered test sends `hits` of each
    class's 10 images to class 1 (the rest stay right)."""
    conf = np.diag([10, 10, 10])
    for c in (0, 2):
        conf[c, c] -= hits
        conf[c, 1] += hits
    return {
        "dataset": "d",
        "model": "m",
        "kind": "clean",
        "seed": seed,
        "clean_val_accuracy_before": 0.9,
        "clean_val_accuracy_after": 0.9,
        "confusion_before": {"sine": conf.tolist()},
        "confusion_after": {"sine": conf.tolist()},
    }


def poisoned_row(t, seed, asr, reg="none", rate=0.1, alpha=0.1, after=None):
    return {
        "dataset": "d",
        "model": "m",
        "kind": "poisoned",
        "trigger": "sine",
        "alpha": alpha,
        "rate": rate,
        "strategy": "many_to_one",
        "regularizer": reg,
        "poison_class": t,
        "seed": seed,
        "num_classes": 3,
        "asr_before": asr,
        "asr_after": asr / 2 if after is None else after,
        "clean_val_accuracy_before": 0.9,
        "clean_val_accuracy_after": 0.88,
        "n_poisons": 5,
        "poison_class_train_size": 50,
        "effective_rate": 0.05,
        "source_counts": [2, 0, 3],
    }


def grid_rows():
    rows = [clean_row(0, 1), clean_row(1, 1)]  # clean ASR towards 1: 2/20
    for seed in (0, 1):
        for t, asr in ((0, 0.6), (1, 0.8), (2, 0.7)):
            rows.append(poisoned_row(t, seed, asr + 0.1 * seed))
            rows.append(poisoned_row(t, seed, asr / 2 + 0.1 * seed, reg="snn"))
        rows.append(poisoned_row(1, seed, 0.3, rate=0.05))
        rows.append(poisoned_row(1, seed, 0.2, alpha=0.5))
    return rows


def test_tables_pair_each_run_with_its_clean_victim():
    tab = bt.tables(grid_rows(), GridConfig)["d/m"]
    t2 = tab["table2_triggers"]["sine"]
    assert t2["before"]["asr"]["mean"] == pytest.approx(0.75)  # 0.6..0.9
    assert t2["before"]["asr"]["n"] == 6
    # The clean victim: towards 1, 2 of 20 source images; towards 0 or 2, none.
    assert t2["before"]["clean_victim_asr"]["mean"] == pytest.approx(0.1 / 3)
    assert t2["after"]["asr"]["mean"] == pytest.approx(0.375)
    assert tab["table1_counts"][1]["source_counts"] == [2.0, 0.0, 3.0]
    # The rate curve at the curve class (1) starts at the clean victim.
    curve = tab["rate_curve"]["sine"]
    assert sorted(curve) == [0.0, 0.05, 0.1]
    assert curve[0.0]["before"]["asr"]["mean"] == pytest.approx(0.1)
    assert curve[0.1]["before"]["asr"]["mean"] == pytest.approx(0.85)
    assert sorted(tab["alpha_curve"]["sine"]) == [0.1, 0.5]
    snn = tab["regularizers"]["snn"]["sine"]
    assert snn["paper_average_asr"] == 0.51
    assert snn["per_class"][0]["before"]["asr"]["mean"] == pytest.approx(0.35)


def test_effects_are_paired_differences_with_verdicts():
    eff = bt.effects(grid_rows(), GridConfig)["d/m"]["sine"]
    learnt = eff["backdoor_learnt"]
    # Poisoned minus clean: 0.6 - 0, 0.8 - 0.1, 0.7 - 0, each + 0.1 for seed 1.
    assert learnt["difference"]["mean"] == pytest.approx((0.6 + 0.7 + 0.7) / 3 + 0.05)
    assert learnt["verdict"] == "reproduced"
    snn = eff["lowered_by_snn"]
    # snn - none = -asr / 2 of seed 0's ASR per class, either seed: -0.3, -0.4, -0.35.
    assert snn["difference"]["mean"] == pytest.approx(-0.35)
    assert snn["verdict"] == "reproduced"
    tuned = eff["lowered_by_fine_tuning"]
    assert tuned["verdict"] == "reproduced"
    # Accuracies: poisoned 0.9 -> 0.88, clean victims 0.9 before and after.
    assert learnt["accuracy_difference"]["mean"] == pytest.approx(0.0)
    assert tuned["accuracy_change"]["mean"] == pytest.approx(-0.02)
    # Left after fine-tuning (asr / 2) minus the clean victim's after (0.1 at 1).
    left = [0.3, 0.4 - 0.1, 0.35, 0.35, 0.45 - 0.1, 0.4]
    assert tuned["left_vs_clean_victim"]["mean"] == pytest.approx(np.mean(left))
    # No backdoor (poisoned = clean victim's rate): nothing to lower.
    rows = [clean_row(0, 1), clean_row(1, 1)]
    rows += [poisoned_row(1, s, 0.1, after=0.1) for s in (0, 1)]
    rows += [poisoned_row(1, s, 0.0, reg="snn") for s in (0, 1)]
    eff = bt.effects(rows, GridConfig)["d/m"]["sine"]
    assert eff["backdoor_learnt"]["verdict"] == "not reproduced"
    assert eff["lowered_by_snn"]["verdict"].startswith("not measurable")
    text = bt.markdown(bt.tables(rows, GridConfig), {"d/m": {"sine": eff}})
    assert "| backdoor learnt (sine) |" in text and "(paper: 51%)" in text
    assert "| clean accuracy change by fine-tuning (sine) | - | -2.0 [" in text
