"""The defence grid: its pieces on tiny cases; the `defences` and `evaluate_poisons`
experiments through the CLI (slow), the latter on poisons frogs_benchmark exports
in the poisoning benchmark's format, whose victims it must train again exactly."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpoison import UserInputError
from jaxpoison.attacks.interop import save_benchmark_setups
from jaxpoison.defences import grid
from jaxpoison.experiments import gradient_matching as gmx
from jaxpoison.experiments.poisonings import CRAFTERS, KINDS, read_benchmark_poisons
from jaxpoison.victims import make_train_data
from tests.cli_runs import run_cli
from tests.conftest import load_config
from tests.test_defences import _tiny_model
from tests.test_polytope import numpy_reference


def test_read_benchmark_poisons_stacks_setup_folders(tmp_path):
    rng = np.random.default_rng(0)
    poisons = {
        "setup": np.array([0, 1]),
        "poisons": rng.integers(0, 256, (2, 3, 4, 4, 3)).astype(np.uint8),
        "base_indices": np.array([[5, 6, 7], [1, 2, 3]]),
        "target_indices": np.array([1, 0]),
        "base_class": np.array([4, 2]),
        "target_class": np.array([9, 8]),
    }
    test_images = rng.integers(0, 256, (2, 4, 4, 3)).astype(np.uint8)
    save_benchmark_setups(str(tmp_path), poisons, test_images)
    got = read_benchmark_poisons(str(tmp_path))
    np.testing.assert_array_equal(got["poisons"], poisons["poisons"])
    np.testing.assert_array_equal(got["base_indices"], poisons["base_indices"])
    np.testing.assert_array_equal(got["poison_label"], [4, 2])
    np.testing.assert_array_equal(got["target_class"], [9, 8])
    np.testing.assert_allclose(got["target_image"], test_images[[1, 0]] / 255.0)
    assert list(got["folder"]) == ["setup_000", "setup_001"]
    one = read_benchmark_poisons(str(tmp_path / "setup_001"))
    np.testing.assert_array_equal(one["base_indices"], [[1, 2, 3]])
    # A folder of our own: tmp_path.parent holds other tests' folders, some of
    # them in the benchmark's format.
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserInputError, match="no poisons"):
        read_benchmark_poisons(str(empty))


def test_defences_config_crosses_every_attack_with_every_defence():
    """Every attack has a registered kind (and crafter); the polytopes share
    feature collision's setups and victims; gradient matching's entry is
    configs/gradient_matching.py's config at the same size."""
    config = load_config("defences.py", "smoke")
    assert set(config.attacks) == {
        "feature_collision",
        "convex_polytope",
        "bullseye_polytope",
        "gradient_matching",
        "badnets",
        "blend",
    }
    assert len(config.defences) == len(grid.DEFENCES)
    for name, entry in config.attacks.items():
        assert entry.kind in KINDS, name
    fc = config.attacks.feature_collision
    for name in ("convex_polytope", "bullseye_polytope"):
        entry = config.attacks[name]
        assert entry.crafter == name and name in CRAFTERS
        assert entry.craft.to_dict() == {"iterations": 2}
        assert (entry.setups, entry.victim) == (fc.setups, fc.victim)
    gm = config.attacks.gradient_matching
    alone = load_config("gradient_matching.py", "smoke")
    assert gm.craft == alone.craft and gm.victim == alone.victim
    assert gm.num_setups == alone.num_setups and gm.per_class == alone.per_class
    gmx.check_config(gm)
    only = load_config("defences.py", "attacks=convex_polytope+gradient_matching")
    assert set(only.attacks) == {"convex_polytope", "gradient_matching"}
    assert only.attacks.convex_polytope.craft.iterations == 1200
    with pytest.raises(UserInputError, match="unknown attack"):
        load_config("defences.py", "attacks=polytope")


class _LinearFeatures:
    """A 'model' whose penultimate features are W^T vec(x)."""

    def apply(self, variables, x, train=False):
        del train
        feats = x.reshape(x.shape[0], -1) @ variables["w"]
        return feats, feats


@pytest.mark.parametrize(
    "name, method", [("convex_polytope", "cp"), ("bullseye_polytope", "bp")]
)
def test_registry_polytope_crafters_match_the_numpy_reference(name, method):
    """The grid's crafter crafts white-box on the model's features, with the
    method its name says: equal to test_polytope's independent float64 loop."""
    rng = np.random.default_rng(13)
    w = rng.normal(size=(48, 6)) / 7.0
    bases = rng.uniform(0.1, 0.9, (4, 4, 4, 3))
    target = rng.uniform(0.1, 0.9, (4, 4, 3))
    crafter = CRAFTERS[name]
    config = crafter.config(iterations=4, epsilon=1.0, coefficient_tol=1e-9)
    ours = jax.jit(
        lambda b, t: crafter.craft(
            _LinearFeatures(), {"w": jnp.asarray(w, jnp.float32)}, b, t, config
        )
    )(jnp.asarray(bases, jnp.float32), jnp.asarray(target, jnp.float32))
    reference = numpy_reference(method, w, bases, target, config, 4)
    np.testing.assert_allclose(np.asarray(ours), reference, atol=1e-4)


def test_defence_lists_and_options_are_checked():
    filters = {"deep_knn": {"k_factor": 2.0}}
    with pytest.raises(UserInputError, match="start with 'none'"):
        grid.check_defences(("deep_knn",), filters, {})
    with pytest.raises(UserInputError, match="unknown defence"):
        grid.check_defences(("none", "strip"), filters, {})
    with pytest.raises(UserInputError, match="no options"):
        grid.check_defences(("none", "mixup"), filters, {})
    with pytest.raises(UserInputError, match="unknown option"):
        grid.check_defences(("none",), {"deep_knn": {"k": 3}}, {})
    with pytest.raises(UserInputError, match="unknown option"):
        grid.defence_configs(grid.TrainConfig(), {"mixup": {"alpha": 1.0}})


def test_representations_swap_poisons_in_both_ways():
    """The training rows' features, poisons swapped in: from cached clean features
    and from a forward pass per row alike, on a subset with one unused slot."""
    model = _tiny_model()
    variables = model.init(jax.random.key(0))
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (7, 4, 4, 3)).astype(np.uint8)
    labels = (np.arange(7) % 3).astype(np.int32)
    poisons = rng.uniform(size=(2, 4, 4, 3)).astype(np.float32)
    data = make_train_data(
        images, labels, poisons, np.array([4, -1], np.int32), np.array([2, 0])
    )._replace(subset=jnp.array([1, 4, 6]))
    forward = grid.representations(model, variables, data, batch=2)
    x = images[[1, 4, 6]].astype(np.float32) / 255.0
    x[1] = poisons[0]
    expected = model.apply(variables, jnp.asarray(x))[1]
    np.testing.assert_allclose(forward, expected, rtol=1e-5, atol=1e-6)
    feats = model.apply(variables, jnp.asarray(images, jnp.float32) / 255.0)[1]
    cached = grid.representations(model, variables, data._replace(features=feats))
    np.testing.assert_allclose(cached, expected, rtol=1e-5, atol=1e-6)
    got_labels, is_poison, _ = grid.poisoned_rows(data, data.subset)
    np.testing.assert_array_equal(got_labels, [1, 2, 0])
    np.testing.assert_array_equal(is_poison, [False, True, False])


def _rows(workdir):
    text = (workdir / "results.jsonl").read_text()
    return [json.loads(x) for x in text.split("\n") if x]


@pytest.mark.slow
@pytest.mark.realdata
def test_defences_smoke_runs_every_attack_and_defence(
    cifar_tfds_dir, shared_data, tmp_path
):
    workdir = tmp_path / "defences"
    run_cli(
        ["--config", "configs/defences.py:smoke", "--data_dir", cifar_tfds_dir],
        workdir,
    )
    rows = _rows(workdir)
    defences = {r["defence"] for r in rows}
    assert len(defences) == 7
    transfer = {"feature_collision", "convex_polytope", "bullseye_polytope"}
    every = {*transfer, "gradient_matching", "badnets", "blend"}
    assert {r["attack"] for r in rows} == every
    # 2 setups per transfer attack and for gradient matching, 1 seed per backdoor
    assert len(rows) == 7 * (3 * 2 + 2 + 1 + 1)
    for r in rows:
        if r["defence"] in grid.FILTERS:
            assert 0.0 <= r["poison_recall"] <= 1.0
    summary = json.loads((workdir / "summary.json").read_text())
    assert set(summary["table"]["attack=badnets"]) == {f"defence={d}" for d in defences}
    assert (workdir / "success_vs_accuracy.png").exists()


@pytest.mark.slow
@pytest.mark.realdata
def test_evaluate_poisons_retrains_frogs_benchmark_victims(cifar_tfds_dir, tmp_path):
    """frogs_benchmark's smoke run exports its poisons in the benchmark's format;
    evaluate_poisons reads them and, undefended, trains the same victims (same
    rows, poisons, seeds and settings): the same target predictions."""
    frogs = tmp_path / "frogs"
    run_cli(
        ["--config", "configs/frogs_benchmark.py:smoke", "--data_dir", cifar_tfds_dir],
        frogs,
    )
    evaluated = tmp_path / "evaluated"
    poisons_dir = frogs / "benchmark_format"
    run_cli(
        [
            "--config",
            f"configs/evaluate_poisons.py:smoke,poisons_dir={poisons_dir}",
            "--data_dir",
            cifar_tfds_dir,
        ],
        evaluated,
    )
    theirs = {r["setup"]: r["prediction"] for r in _rows(frogs)}
    ours = {
        r["setup"]: r["prediction"] for r in _rows(evaluated) if r["defence"] == "none"
    }
    assert ours == theirs
    assert len(_rows(evaluated)) == 7 * len(theirs)
