"""The Truong et al. backdoor grid: cells, split, poisons, metrics, the CLI run."""

from __future__ import annotations

import json
import math
import os
import subprocess

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpoison import UserInputError
from jaxpoison.attacks import triggers
from jaxpoison.data import load_cifar10_sample
from jaxpoison.data.splits import backdoor_protocol_split, random_subset
from jaxpoison.experiments import backdoor_grid as bg
from jaxpoison.models.base import Classifier, LinearHead, from_flax
from jaxpoison.report import write_report
from jaxpoison.victims import make_train_data
from jaxpoison.victims.metrics import backdoor_metrics
from tests.cli_runs import (
    REPO,
    assert_resumes_identically,
    chunk_committed,
    cli_command,
    cli_env,
    run_cli,
)
from tests.conftest import load_config

SMOKE = ["--config", "configs/backdoor_grid.py:smoke"]


def test_default_grid_has_the_slices_of_the_papers_outputs():
    config = load_config("backdoor_grid.py")
    cells = bg.grid_cells(config, "cifar10", 10)
    # The black square at every poison class (Table 2), its alpha curve (0.1, 0.5;
    # alpha 1 is the default) and rate curve (0.05) at truck (9), SNN at every
    # poison class.
    assert len(cells) == 10 + 2 + 1 + 10 == len(set(cells))
    none = [c for c in cells if c.regularizer == "none"]
    assert {c.poison_class for c in none if c.alpha == 1.0 and c.rate == 0.1} == set(
        range(10)
    )
    curves = [c for c in none if c.alpha != 1.0 or c.rate != 0.1]
    assert {c.poison_class for c in curves} == {9}
    assert {c.poison_class for c in cells if c.regularizer == "snn"} == set(range(10))
    assert config.datasets == ("cifar10", "flowers")  # rose's curves too
    assert load_config("backdoor_grid.py", "runlocal").datasets == ("cifar10",)
    flowers = bg.grid_cells(config, "flowers", 5)
    assert flowers[5] == bg.Cell("black_square", 0.1, 0.1, "many_to_one", "none", 2)
    paper = load_config("backdoor_grid.py", "paper")
    big = bg.grid_cells(paper, "cifar10", 10)
    # 4 triggers x (10 classes x 2 strategies + 4 more alphas + 4 more rates), then
    # 4 regularisers x 4 triggers x 10 classes.
    assert len(big) == 4 * (20 + 4 + 4) + 4 * 4 * 10 == len(set(big))
    assert {c.strategy for c in big} == {"many_to_one", "one_to_one"}


def test_protocol_is_adam_batch_32_lr_1e_5_at_paper_size():
    """Sec. 4.3: Adam, lr 1e-5, mini-batch 32; fine-tuning a fixed number of
    epochs (no early stopping). The default keeps Adam and batch 32 at lr 1e-3
    (README: at this size lr 1e-5 learns no backdoor)."""
    for arg, lr in ((None, 1e-3), ("paper", 1e-5), ("lr=1e-5", 1e-5)):
        config = load_config("backdoor_grid.py", arg)
        for part in (config.victim, config.finetune):
            assert (part.optimizer, part.learning_rate, part.batch_size) == (
                "adam",
                lr,
                32,
            )
        assert config.patience == 5 and "finetune_patience" not in config


def test_protocol_split_is_76_19_5_then_80_20():
    config = load_config("backdoor_grid.py")
    labels = np.random.default_rng(0).integers(0, 10, 2000)
    s = backdoor_protocol_split(labels, config.split, config.inner_split, 0, seed=3)
    poison = len(s["poison_train"]) + len(s["poison_val"])
    clean = len(s["clean_train"]) + len(s["clean_val"])
    assert poison == math.floor(0.76 * 2000) and clean == math.floor(0.19 * 2000)
    assert len(s["poison_train"]) == math.floor(0.8 * poison)
    assert len(s["clean_train"]) == math.floor(0.8 * clean)
    rows = np.concatenate([s[k] for k in s])
    adv_all = 2000 - poison - clean - 1  # one held-out row
    assert len(s["adversarial"]) == adv_all - np.sum(
        labels[np.setdiff1d(np.arange(2000), rows)] == 0
    )
    assert len(np.unique(rows)) == len(rows)  # disjoint
    assert not np.any(labels[s["adversarial"]] == 0)
    # No poison class (the grid's: it varies): the same split, every class tested.
    every = backdoor_protocol_split(
        labels, config.split, config.inner_split, None, seed=3
    )
    assert len(every["adversarial"]) == adv_all
    assert np.array_equal(every["poison_train"], s["poison_train"])


def test_random_subset_is_sorted_seeded_and_all_rows_without_a_size():
    rows = random_subset(100, 30, seed=4)
    assert len(np.unique(rows)) == 30 and np.all(np.diff(rows) > 0)
    assert np.array_equal(rows, random_subset(100, 30, seed=4))
    assert not np.array_equal(rows, random_subset(100, 30, seed=5))
    assert np.array_equal(random_subset(10, 0, seed=4), np.arange(10))
    assert np.array_equal(random_subset(10, 20, seed=4), np.arange(10))


def test_poisons_are_blended_triggered_source_images_in_poison_class_rows():
    config = load_config("backdoor_grid.py")
    sample = load_cifar10_sample("train")
    images, labels = sample.images, sample.labels  # 30 per class
    fns = {"black_square": triggers.make_trigger("black_square")}
    cells = [
        (bg.Cell("black_square", 0.5, 0.2, "many_to_one", "none", 3), 0),
        (bg.Cell("black_square", 1.0, 0.1, "one_to_one", "none", 9), 1),
        (None, 0),  # the clean victim
    ]
    specs = bg.poison_specs(images, labels, cells, fns, config, 1, 10)
    p_img, p_idx, p_lab = (specs[k] for k in bg.POISON_FIELDS)
    counts = np.sum(p_idx >= 0, axis=1)
    assert list(counts) == [6, 3, 0]  # floor(0.2 * 30), floor(0.1 * 30)
    assert p_idx.shape == (3, 6) and np.all(np.asarray(p_idx[1, 3:]) == -1)
    assert list(specs["source_counts"].sum(axis=1)) == [6, 3, 0]
    assert specs["source_counts"][1, 0] == 3  # one-to-one on 9: (9 + 1) mod 10
    for t, (cell, _) in enumerate(cells[:2]):
        n = counts[t]
        rows = np.asarray(p_idx[t, :n])
        assert np.all(labels[rows] == cell.poison_class)
        assert np.all(np.asarray(p_lab[t, :n]) == cell.poison_class)
        # Each poison is Eq. 7 of some source image: find it among the sources.
        x = images.astype(np.float32) / 255.0
        side, top, left = triggers.square_geometry(images.shape[1:])
        pasted = x.copy()
        pasted[:, top : top + side, left : left + side] = 0.0
        expected = (1 - cell.alpha) * x + cell.alpha * pasted
        allowed = (
            labels != cell.poison_class
            if cell.strategy == "many_to_one"
            else labels == (cell.poison_class + 1) % 10
        )
        for p in np.asarray(p_img[t, :n]):
            dist = np.abs(expected - p).reshape(len(x), -1).max(axis=1)
            assert dist.min() < 1e-6 and allowed[np.argmin(dist)]


class TinyBackbone(nn.Module):
    """A strided conv, BatchNorm and a dense layer: compiles in a second."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3), strides=(4, 4))(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.relu(x).reshape(x.shape[0], -1)
        return nn.relu(nn.Dense(16)(x))


def test_metrics_equal_a_direct_computation_per_trial():
    """Confusion counts and accuracies of two victims against model.apply."""
    module = Classifier(TinyBackbone(), LinearHead(10), (0.5,) * 3, (0.25,) * 3)
    model = from_flax("tiny", module, (32, 32, 3), 10)
    variables = model.init(jax.random.key(0))
    sample = load_cifar10_sample("test")
    rng = np.random.default_rng(0)
    noisy = jax.tree.map(
        lambda v: v + 0.01 * rng.normal(size=v.shape).astype(v.dtype),
        variables["params"],
    )
    victims = jax.tree.map(
        lambda a, b: jnp.stack([a, b]), variables, {**variables, "params": noisy}
    )
    adv_rows = np.arange(0, 300, 15)
    adv_clean = sample.images[adv_rows].astype(np.float32) / 255.0
    adv_y = sample.labels[adv_rows]
    # Two triggered sets per victim (K = 2): flipped and darkened copies.
    sets = np.stack([adv_clean[:, ::-1], 0.5 * adv_clean])
    triggered = jnp.stack([sets, sets[::-1]])
    va = np.arange(30)
    poisons = rng.uniform(size=(2, 2, 32, 32, 3)).astype(np.float32)
    p_idx = np.array([[1, 4], [2, -1]], np.int32)
    p_lab = np.zeros((2, 2), np.int32)
    val = jax.tree.map(
        jnp.asarray, make_train_data(sample.images[va], sample.labels[va])
    )
    cv = np.arange(40, 60)

    def metrics(args):  # one victim, mapped over two as the grid does
        v, x, p_img, p_i, p_l = args
        return backdoor_metrics(
            model,
            v,
            x,
            (jnp.asarray(adv_clean), jnp.asarray(adv_y)),
            val._replace(poison_images=p_img, poison_indices=p_i, poison_labels=p_l),
            (jnp.asarray(sample.images[cv]), jnp.asarray(sample.labels[cv])),
        )

    out = jax.jit(lambda a: jax.lax.map(metrics, a))(
        (victims, triggered, poisons, p_idx, p_lab)
    )
    for t in range(2):
        v = jax.tree.map(lambda a: a[t], victims)

        def pred(x):
            return np.argmax(np.asarray(model.apply(v, jnp.asarray(x))[0]), -1)

        for k in range(2):
            conf = np.zeros((10, 10), int)
            for y, p in zip(adv_y, pred(np.asarray(triggered[t, k])), strict=True):
                conf[y, p] += 1
            np.testing.assert_array_equal(out["triggered_confusion"][t, k], conf)
        vx = sample.images[va].astype(np.float32) / 255.0
        vy = sample.labels[va].copy()
        for slot in range(2):
            if p_idx[t, slot] >= 0:
                vx[p_idx[t, slot]] = poisons[t, slot]
                vy[p_idx[t, slot]] = 0
        np.testing.assert_allclose(
            out["poisoned_val_accuracy"][t], np.mean(pred(vx) == vy), atol=1e-6
        )
        clean = sample.images[cv].astype(np.float32) / 255.0
        np.testing.assert_allclose(
            out["clean_val_accuracy"][t],
            np.mean(pred(clean) == sample.labels[cv]),
            atol=1e-6,
        )
        np.testing.assert_allclose(
            out["adversarial_clean_accuracy"][t],
            np.mean(pred(adv_clean) == adv_y),
            atol=1e-6,
        )


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"datasets": ("imagenet",)}, "unknown dataset"),
        ({"alphas": (1.5,)}, "alpha"),
        ({"rates": (-0.1,)}, "poison rate"),
        ({"regularizer_triggers": ("sine2",)}, "regularizer_triggers"),
        ({"one_to_one_offset": 0}, "one_to_one_offset"),
        ({"rate": 0.0}, "above 0"),
        ({"victim.optimizer": "rmsprop"}, "optimizer"),
    ],
)
def test_bad_config_is_a_one_line_user_input_error(overrides, message, tmp_path):
    config = load_config("backdoor_grid.py", "runlocal")
    for key, value in overrides.items():
        target = config
        *path, last = key.split(".")
        for part in path:
            target = target[part]
        target[last] = value
    with pytest.raises(UserInputError, match=message) as info:
        bg.run(config, str(tmp_path))
    assert "\n" not in str(info.value)
    assert not os.listdir(tmp_path)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The smoke grid through the CLI: 2 clean victims and 2 poisoned runs (truck,
    black square) in 2 chunks."""
    workdir = tmp_path_factory.mktemp("backdoor_grid") / "whole"
    run_cli(SMOKE, workdir)
    return workdir


@pytest.mark.experiment
def test_smoke_run_writes_rows_tables_and_one_curve(smoke_run):
    rows = [
        json.loads(x)
        for x in (smoke_run / "results.jsonl").read_text().split("\n")
        if x
    ]
    assert [(r["kind"], r["seed"]) for r in rows] == [
        ("clean", 0),
        ("clean", 1),
        ("poisoned", 0),
        ("poisoned", 1),
    ]
    for r in rows[:2]:
        assert set(r["confusion_before"]) == {"black_square"}
        assert np.sum(r["confusion_before"]["black_square"]) > 0
    for r in rows[2:]:
        assert r["n_poisons"] == math.floor(r["rate"] * r["poison_class_train_size"])
        assert r["poison_class"] == 9 and sum(r["source_counts"]) == r["n_poisons"]
        assert 0 <= r["asr_before"] <= 1 and 0 <= r["clean_val_accuracy_after"] <= 1
        assert r["asr_before"] == r["asr_hits_before"] / r["asr_n"]
        assert r["epochs_run"] == 1 and r["finetune_epochs"] == 1
        # Early stopping's own validation number is the evaluation's: the same
        # poisoned val split (the run's poisons).
        assert abs(r["best_val_accuracy"] - r["poisoned_val_accuracy_before"]) < 1e-6
    summary = json.loads((smoke_run / "summary.json").read_text())
    t = summary["tables"]["cifar10_sample/resnet20"]
    assert set(t["rate_curve"]["black_square"]) == {"0.0", "0.1"}
    assert t["table2_triggers"]["black_square"]["before"]["clean_victim_asr"]["n"] == 2
    effect = summary["effects"]["cifar10_sample/resnet20"]["black_square"]
    assert effect["backdoor_learnt"]["verdict"] in ("reproduced", "not reproduced")
    # One alpha: no alpha curve, so no empty figure; one regulariser: no figure.
    assert (smoke_run / "rate.png").stat().st_size > 0
    assert not (smoke_run / "alpha.png").exists()
    assert not (smoke_run / "regularizers.png").exists()
    assert (smoke_run / "tables.md").stat().st_size > 0
    assert (
        "| cifar10_sample/resnet20/none | 4 of 4 | finished |"
        in open(write_report(str(smoke_run))).read()
    )


@pytest.mark.slow
def test_sigkilled_grid_resumes_identically(smoke_run, tmp_path):
    assert_resumes_identically(
        SMOKE,
        tmp_path,
        smoke_run,
        killed_when=chunk_committed(0, sweep="cifar10_sample/resnet20/none"),
    )


@pytest.mark.experiment
def test_a_workdir_of_another_grid_is_refused(smoke_run):
    """Resuming with other settings would mix two grids in one results file."""
    before = (smoke_run / "results.jsonl").read_bytes()
    proc = subprocess.run(
        cli_command(["--config", "configs/backdoor_grid.py:smoke,seed=1"], smoke_run),
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "different config" in proc.stderr
    assert (smoke_run / "results.jsonl").read_bytes() == before
