"""The benchmark's transfer table for fc / cp / bp: config arguments, and (slow) the
CLI run of the polytope attacks at the smoke size, killed and resumed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxpoison import UserInputError
from jaxpoison.attacks.interop import load_benchmark_format, load_poisons_npz
from tests.cli_runs import assert_resumes_identically, chunk_committed, run_cli
from tests.conftest import load_config


def test_attack_fc_is_the_frogs_benchmark_config():
    """Same crafting, victims and setups: attack=fc reproduces frogs_benchmark."""
    ours = load_config("benchmark_transfer.py", "attack=fc")
    frogs = load_config("frogs_benchmark.py")
    for key in ("craft", "victim", "num_setups", "chunk_size", "per_class", "model"):
        assert ours[key] == frogs[key], key


def test_polytope_defaults_are_the_benchmarks():
    config = load_config("benchmark_transfer.py", "attack=cp")
    assert (config.craft.iterations, config.craft.step_size) == (1200, 0.04)
    assert config.craft.epsilon == 8 / 255 and config.num_setups == 25
    assert load_config("benchmark_transfer.py", "attack=bp,paper").num_setups == 100
    assert load_config("benchmark_transfer.py", "iterations=7").craft.iterations == 7


def test_unknown_attack_is_a_user_error():
    with pytest.raises(UserInputError, match="fc, cp or bp"):
        load_config("benchmark_transfer.py", "attack=gm")


def smoke_args(attack: str, data_dir: str) -> list[str]:
    return [
        "--config",
        f"configs/benchmark_transfer.py:attack={attack},smoke",
        "--data_dir",
        data_dir,
    ]


def read_rows(workdir) -> list[dict]:
    text = (workdir / "results.jsonl").read_text()
    return [json.loads(x) for x in text.split("\n") if x]


@pytest.mark.slow  # 3 CLI runs: 4-4.5 min wall on the 2 shared cores (load ~12)
@pytest.mark.realdata
@pytest.mark.parametrize("attack", ["cp", "bp"])
def test_polytope_smoke_run_resumes_identically_after_sigkill(
    attack, cifar_tfds_dir, tmp_path
):
    args = smoke_args(attack, cifar_tfds_dir)
    whole = tmp_path / "whole"
    run_cli(args, whole)
    rows = read_rows(whole)
    assert [r["setup"] for r in rows] == [0, 1, 2, 3]
    # 8/255 ball, then the benchmark's 8-bit truncation: at most 9/255.
    assert all(r["max_perturbation"] <= 9 / 255 + 1e-6 for r in rows)
    assert all(r["craft_iterations"] == 2 for r in rows)
    if attack == "bp":  # fixed coefficients: every poison carries weight
        assert all(r["active_poisons"] == 25 for r in rows)
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["attack"] == attack and summary["success"]["n"] == 4
    poisons = load_poisons_npz(str(whole / "poisons.npz"))
    assert poisons["poisons"].shape == (4, 25, 32, 32, 3)
    setup1 = load_benchmark_format(str(whole / "benchmark_format" / "setup_001"))
    np.testing.assert_array_equal(setup1["poisons"], poisons["poisons"][1])
    resumed = assert_resumes_identically(
        args, tmp_path, whole, killed_when=chunk_committed(0)
    )
    again = load_poisons_npz(str(resumed / "poisons.npz"))
    for k in poisons:
        np.testing.assert_array_equal(again[k], poisons[k])


@pytest.mark.slow  # one CLI run: 2 min wall on the shared cores
@pytest.mark.realdata
def test_bp_with_a_two_model_crafting_ensemble_runs(
    cifar_tfds_dir, shared_data, tmp_path
):
    """Crafting against ResNet-20 and ResNet-32 (the shared pretrained weights)."""
    args = smoke_args("bp", cifar_tfds_dir)
    args[1] += ",ensemble=resnet20+resnet32,setups=2"
    run_cli(args, tmp_path / "run")
    rows = read_rows(tmp_path / "run")
    assert len(rows) == 2 and all(r["active_poisons"] == 25 for r in rows)
    assert all(r["max_perturbation"] <= 9 / 255 + 1e-6 for r in rows)


def test_ensemble_argument_names_models():
    config = load_config("benchmark_transfer.py", "ensemble=resnet32+resnet56")
    assert config.ensemble == ("resnet32", "resnet56")
    assert load_config("benchmark_transfer.py").ensemble == ()
