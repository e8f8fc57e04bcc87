"""Poison Frogs' one-shot kill: clean-victim control, input checks, and the CLI run
end to end (smoke size, shipped sample) and resumed after a SIGKILL (the angles:
tests/test_analysis.py)."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpoison import UserInputError
from jaxpoison.attacks import feature_collision as fc
from jaxpoison.data import load_cifar10_sample
from jaxpoison.experiments import frogs_oneshot as fo
from jaxpoison.models import (
    head_variables,
    load_pretrained,
    shipped_weights,
    task_model,
)
from jaxpoison.report import write_report
from jaxpoison.results import read_jsonl
from jaxpoison.victims import TrainConfig, cache_features, make_train_data, train
from tests.cli_runs import assert_resumes_identically, chunk_committed, run_cli

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "frogs_oneshot.py"
SMOKE = ["--config", "configs/frogs_oneshot.py:smoke"]


def get_config(arg=None):
    spec = importlib.util.spec_from_file_location("frogs_oneshot_config", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="module")
def pretrained():
    return load_pretrained("resnet20", shipped_weights("resnet20"))


@pytest.mark.heavy
def test_clean_victims_reproduce_a_separately_trained_clean_victim(pretrained):
    """The trials with the poison slot unused are the clean victim: same rows (the
    clean subset + the unpoisoned base), same seed, trained on its own."""
    _, variables = pretrained
    train_set, test_set = load_cifar10_sample("train"), load_cifar10_sample("test")
    classes = (5, 6)
    rows = {c: np.flatnonzero(train_set.labels == c) for c in classes}
    clean_rows = np.concatenate([rows[c][:4] for c in classes])
    base_rows = np.array([rows[6][10], rows[5][11]])  # target classes 5 and 6
    pool = np.concatenate([clean_rows, base_rows])
    pool_labels = (train_set.labels[pool] == 6).astype(np.int32)
    model, task_vars = task_model("resnet20", variables, 2)
    victim_cfg = TrainConfig(
        mode="linear",
        cold_start_head=True,
        optimizer="adam",
        learning_rate=0.01,
        epochs=3,
        batch_size=4,
    )
    craft_cfg = fc.FCConfig(
        iterations=2, step_size=0.01, step_rule="paper", constraint="prox"
    )
    pool_data = cache_features(
        model, task_vars, make_train_data(train_set.images[pool], pool_labels)
    )
    test_rows = np.flatnonzero(np.isin(test_set.labels, classes))
    test_labels = (test_set.labels[test_rows] == 6).astype(np.int32)
    test_features = cache_features(
        model, task_vars, make_train_data(test_set.images[test_rows], test_labels)
    ).features
    target_pos = np.array(
        [np.flatnonzero(test_labels == 0)[0], np.flatnonzero(test_labels == 1)[0]]
    )
    targets = jnp.asarray(test_set.images[test_rows][target_pos], jnp.float32) / 255
    base_pool_row = jnp.array([8, 9], jnp.int32)
    base_label = jnp.array([1, 0], jnp.int32)
    seed = jnp.array([3, 4], jnp.int32)
    chunk_fn = jax.jit(
        functools.partial(fo.oneshot_trials, model, craft_cfg, victim_cfg, True)
    )
    shared = {
        "pool": pool_data,
        "variables": task_vars,
        "test_features": test_features,
        "test_labels": jnp.asarray(test_labels),
        "clean_subsets": (jnp.arange(8, dtype=jnp.int32),),
    }
    spec = {
        "target_image": targets,
        "target_pos": jnp.asarray(target_pos),
        "base_pool_row": base_pool_row,
        "base_label": base_label,
        "seed": seed,
    }
    out = chunk_fn(shared, spec)
    target_features = fc.target_features(model, task_vars, targets)
    for i in range(2):
        subset = np.concatenate([np.arange(8), [int(base_pool_row[i])]])
        alone = make_train_data(train_set.images[pool][subset], pool_labels[subset])
        trained, _ = train(
            model, task_vars, alone, jax.random.key(int(seed[i])), victim_cfg
        )
        head = head_variables(trained)
        probs = jax.nn.softmax(model.apply_head(head, target_features[i][None])[0])
        pred = jnp.argmax(model.apply_head(head, test_features), -1)
        keep = np.arange(len(test_labels)) != target_pos[i]
        accuracy = np.mean(np.asarray(pred == test_labels)[keep])
        np.testing.assert_allclose(
            out["clean_victim_base_class_prob"][i, 0],
            probs[int(base_label[i])],
            rtol=1e-4,
            atol=1e-6,
        )
        np.testing.assert_allclose(out["clean_accuracy"][i, 0], accuracy, atol=1e-6)
    # The poisoned victims trained on the poison instead: their heads differ.
    assert np.all(np.asarray(out["angle_deg"]) > 0.0)
    assert not np.allclose(
        out["base_class_prob"], out["clean_victim_base_class_prob"], rtol=1e-4
    )


def sample_config(**overrides):
    config = get_config("runlocal")
    config.dataset = "cifar10_sample"
    config.num_targets = 2
    config.chunk_size = 2
    config.per_class = (3,)
    config.craft.iterations = 2
    config.victim.epochs = 2
    for key, value in overrides.items():
        target = config
        *path, last = key.split(".")
        for part in path:
            target = target[part]
        target[last] = value
    return config


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"tasks.two_class": (5, 10)}, "out of range"),
        ({"tasks.two_class": (5, 5)}, "two distinct classes"),
        ({"per_class": (0,)}, "per_class"),
        ({"num_targets": 0}, "num_targets"),
        ({"dataset": "imagenet"}, "unknown dataset"),
        ({"victim.mode": "end_to_end"}, "cold start"),
        ({"per_class": (30,)}, "no base image"),  # the sample has 30 per class
        ({"num_targets": 100}, "classified correctly"),  # 60 test images per pair
    ],
)
def test_bad_input_is_a_one_line_user_input_error(overrides, message, tmp_path):
    with pytest.raises(UserInputError, match=message) as info:
        fo.run(sample_config(**overrides), str(tmp_path))
    assert "\n" not in str(info.value)


def test_missing_data_dir_is_a_user_input_error(tmp_path):
    config = sample_config(dataset="cifar10", data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(UserInputError, match="not prepared"):
        fo.run(config, str(tmp_path / "work"))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One uninterrupted smoke run through the CLI (shared by the tests below)."""
    workdir = tmp_path_factory.mktemp("frogs_oneshot") / "whole"
    run_cli(SMOKE, workdir)
    return workdir


@pytest.mark.experiment
def test_smoke_run_writes_rows_summary_and_plot(smoke_run):
    rows = read_jsonl(str(smoke_run / "results.jsonl"))
    assert len(rows) == 2 * 4  # two tasks, four targets each, one subset size
    assert [r["task"] for r in rows] == ["two_class"] * 4 + ["ten_class"] * 4
    for r in rows:
        assert r["success"] == (r["prediction"] == r["base_class"])
        assert r["base_class"] != r["target_class"]
        assert r["n_train"] == 3 * (2 if r["task"] == "two_class" else 10) + 1
        assert 0.0 <= r["angle_deg"] <= 180.0
    summary = json.loads((smoke_run / "summary.json").read_text())
    two = summary["settings"]["two_class/per_class=3"]
    assert two["n_train"] == 7 and two["n_features_times_classes"] == 128
    assert two["n_train_le_features_times_classes"]
    assert two["n"] == 4
    assert os.path.getsize(smoke_run / "angles.png") > 0
    with open(write_report(str(smoke_run))) as f:
        assert "| two_class | 4 of 4 | finished |" in f.read()


# slow: a second smoke run; the default run keeps the resume contract in
# test_resume.py and test_cli.py (15-minute budget on 2 cores).
@pytest.mark.slow
def test_sigkill_after_the_first_chunk_resumes_identically(smoke_run, tmp_path):
    assert_resumes_identically(
        SMOKE, tmp_path, smoke_run, killed_when=chunk_committed(0, "two_class")
    )
