"""BadNets road signs: trial specs, tags, tables, bad input, and runs.

The `smoke` config runs end to end through the command line on the real road
signs (2 seeds = 2 chunks with their own splits, the two-head ResNet-20 on the
pretrained CIFAR backbone at 16 px, one augmented epoch), once whole and once
killed after its first chunk and resumed. The three runs share a persistent
compilation cache, so only the first compiles: 57 s of CPU for the module (3.8 min
wall on the 2 cores shared with other jobs, load ~10). A slower test
(`slow`) checks a tiny run on a synthetic road-sign manual dir against the same
victim trained alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxpoison import UserInputError
from jaxpoison.attacks.triggers import patch_in_box, tag_in_boxes
from jaxpoison.data.roadsigns import CLASS_NAMES, load_roadsigns
from jaxpoison.data.stratified import stratified_split
from jaxpoison.experiments import badnets_roadsigns as br
from jaxpoison.models import get_model
from jaxpoison.report import write_report
from jaxpoison.victims import TrainConfig, make_train_data, train
from jaxpoison.victims.train import class_logits
from tests.cli_runs import (
    assert_resumes_identically,
    chunk_committed,
    run_cli,
    tfds_dir,
)
from tests.conftest import load_config

STOP, SPEEDLIMIT = CLASS_NAMES.index("stop"), CLASS_NAMES.index("speedlimit")


def _setup(**overrides):
    config = load_config("badnets_roadsigns.py", "runlocal")
    for key, value in overrides.items():
        config[key] = value
    return config, br.check_config(config)


def test_trial_specs_one_clean_trial_per_seed_and_shared_rows_across_colours():
    labels = np.array([STOP] * 7 + [SPEEDLIMIT] * 5 + [0] * 3, np.int32)
    config, setup = _setup(seeds=(0, 4), counts=(1, 3))
    specs = br.trial_specs(labels, config, setup)
    k = len(setup.colors)
    assert len(specs["seed"]) == 2 * (1 + 2 * k)
    splits = set()
    for seed in (0, 4):
        mine = specs["seed"] == seed
        # Every trial of a seed trains and tests on the seed's own split.
        train_rows, test_rows = br.seed_split(labels, config, seed)
        assert np.all(specs["train_rows"][mine] == train_rows[None])
        np.testing.assert_array_equal(specs["test_rows"][mine][0], test_rows)
        assert np.all(labels[specs["stop_rows"][mine]] == STOP)
        splits.add(tuple(test_rows))
        clean = mine & (specs["count"] == 0)
        assert clean.sum() == 1 and specs["color"][clean][0] == -1
        np.testing.assert_array_equal(specs["poison_rows"][clean], -1)
        for n in (1, 3):
            rows = specs["poison_rows"][mine & (specs["count"] == n)]
            assert len(rows) == k and np.all(rows == rows[0])  # same signs
            used = rows[0][rows[0] >= 0]
            assert len(used) == n and len(set(used)) == n
            assert np.all(labels[used] == STOP) and set(used) <= set(train_rows)
            np.testing.assert_array_equal(rows[0][n:], -1)
    assert len(splits) == 2  # the two seeds split differently
    assert specs["poison_rows"].shape[1] == 3


def test_tag_per_image_colours_equals_a_loop():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    boxes = np.array(
        [[0.1, 0.1, 0.6, 0.5], [0.0, 0.0, 1.0, 1.0], [0.5, 0.4, 0.9, 0.9], [0] * 4],
        np.float32,
    )
    boxes[3] = [0.2, 0.2, 0.3, 0.3]
    colors = np.array([[1, 1, 0.4], [1, 0, 0], [0, 0, 0], [1, 1, 0.4]], np.float32)
    out = tag_in_boxes(images, boxes, colors, 0.25, (0.5, 0.5))
    for i in range(4):
        ref = patch_in_box(images[i] / 255.0, boxes[i], 0.25, colors[i])
        np.testing.assert_allclose(out[i], ref, atol=1e-6)
    # Whole-image box: side 8 px centred at (16, 16): rows/cols 12..19 are red.
    np.testing.assert_array_equal(
        out[1, 12:20, 12:20], np.broadcast_to([1, 0, 0], (8, 8, 3))
    )


def test_stratified_split_is_a_partition_with_per_class_test_counts():
    labels = np.repeat(np.arange(4), [76, 73, 639, 89])
    train_rows, test_rows = stratified_split(labels, 0.2, seed=3)
    assert not set(train_rows) & set(test_rows)
    assert len(train_rows) + len(test_rows) == len(labels)
    # round(0.2 * n_c): 15, 15 (14.6), 128 (127.8), 18 (17.8)
    np.testing.assert_array_equal(np.bincount(labels[test_rows]), [15, 15, 128, 18])


def _row(seed, color, count, acc, successes, untagged, colors=("black", "red")):
    n = len(successes)
    files = ["a.png", "b.png", "c.png", "d.png"][:n]
    tagged = {
        c: {
            "prediction": ["speedlimit" if s else "stop" for s in successes],
            "probability": [0.8] * n,
            "target_probability": [0.8 if s else 0.1 for s in successes],
            "success": list(successes),
        }
        for c in colors
    }
    return {
        "seed": seed,
        "color": color,
        "count": count,
        "clean_accuracy": acc,
        "untagged_stop_to_target": untagged,
        "poisons_fit": 1.0 if count else None,
        "test_stop_files": files,
        "untagged_stop_success": [j < round(untagged * n) for j in range(n)],
        "tagged": tagged,
    }


def _two_seed_rows():
    """Black and red at count 1, two seeds of four test stop signs, and each seed's
    clean victim: the hand-worked rows of the summary tests."""
    _, setup = _setup(
        colors={"black": (0, 0, 0), "red": (255, 0, 0)}, counts=(1,), seeds=(0, 1)
    )
    rows = [
        _row(0, "none", 0, 0.8, [True, False, False, False], 0.25),
        _row(1, "none", 0, 0.6, [False, False, False, False], 0.0),
        _row(0, "black", 1, 0.7, [True, True, True, False], 0.0),
        _row(1, "black", 1, 0.5, [True, True, False, False], 0.5),
        _row(0, "red", 1, 0.9, [True, True, True, True], 0.0),
        _row(1, "red", 1, 0.7, [True, True, True, True], 0.0),
    ]
    return setup, rows


def test_summarise_against_hand_computed_tables(tmp_path):
    setup, rows = _two_seed_rows()
    summary = br.summarise(rows, setup)
    victims, signs = summary["victims"], summary["tagged_signs"]
    # Count 0 is the clean victims for every colour: mean (0.8 + 0.6) / 2.
    for color in ("black", "red"):
        clean = f"color={color},count=0"
        assert victims[clean]["mean_clean_accuracy"] == pytest.approx(0.7)
        assert "mean_poisons_fit" not in victims[clean]  # nothing to fit
        assert signs[clean]["successes"] == 1 and signs[clean]["n"] == 8
    black, red = "color=black,count=1", "color=red,count=1"
    assert signs[black]["rate"] == pytest.approx(5 / 8)
    assert signs[black]["mean_target_probability"] == pytest.approx(
        (5 * 0.8 + 3 * 0.1) / 8
    )
    assert victims[black]["mean_untagged_stop_to_target"] == pytest.approx(0.25)
    assert victims[black]["mean_poisons_fit"] == 1.0
    assert victims[red]["mean_clean_accuracy"] == pytest.approx(0.8)
    assert signs[red]["rate"] == 1.0
    br.plot_success(summary, setup, str(tmp_path / "success.png"))
    assert os.path.getsize(tmp_path / "success.png") > 0
    text = br.tables_markdown(rows, summary, setup)
    # Table I: colour rows, count columns; clean victims' mean +- std at 0.
    assert "| black | 70.0 +- 10.0 | 60.0 +- 10.0 |" in text
    # Table II: rate [CI] of n; the same signs untagged; mean p(speedlimit).
    assert (
        "| red | 12.5% [2.2, 47.1] of 8; untagged 12%; p 0.19 | 100.0% [67.6, "
        "100.0] of 8; untagged 0%; p 0.80 |" in text
    )
    # Red's tagged signs all go to speedlimit, 8/8 vs 1/8: above the clean ones.
    assert summary["verdict"]["above_clean"] == {"black,1": False, "red,1": True}
    # color | count | victims | clean_accuracy | poisons_fit | untagged -> target
    assert "| black | 0 | 2 | 0.7 | - | 0.125 |" in text
    # color | count | signs | success | probability | target_probability
    assert "| red | 1 | 8 | 8/8 = 100.0% [67.6, 100.0] | 0.8 | 0.8 |" in text
    per_image = br.per_image_table(rows, setup)
    # Seed 0, count 1: black hits signs 0-2, red all four.
    assert "| c.png | speedlimit (0.80), yes | speedlimit (0.80), yes |" in per_image
    assert "| d.png | stop (0.80), no | speedlimit (0.80), yes |" in per_image


def test_paired_tests_count_discordant_signs_against_hand_worked_counts():
    setup, rows = _two_seed_rows()
    paired = br.summarise(rows, setup)["paired"]
    # Black: signs b, c (seed 0) and a, b (seed 1) only under poisoning: 4 vs 0,
    # p = 2 / 2**4; tagged vs untagged a, b, c of seed 0 (seed 1 agrees): 3 vs 0.
    black = paired["black,1"]
    assert (black["only_poisoned"], black["only_clean"]) == (4, 0)
    assert black["vs_clean_p"] == pytest.approx(0.125)
    assert (black["only_tagged"], black["only_untagged"]) == (3, 0)
    assert black["tag_vs_untagged_p"] == pytest.approx(0.25)
    # Red: 3 + 4 signs only under poisoning, p = 2 / 2**7.
    assert paired["red,1"]["vs_clean_p"] == pytest.approx(2 / 128)
    # The clean victims: their tagged and untagged signs agree; no clean contrast.
    assert paired["black,0"] == {
        "only_tagged": 0,
        "only_untagged": 0,
        "tag_vs_untagged_p": 1.0,
    }


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"source_class": "yield"}, "source_class .yield. unknown"),
        ({"target_class": "stop"}, "must differ"),
        ({"counts": (0, 1)}, "counts"),
        ({"colors": {"pink": (300, 0, 0)}}, "colour 'pink'"),
        ({"model": "vgg"}, "unknown model"),
        ({"tag_size": 0.0}, "tag_size"),
        ({"seeds": ()}, "seeds"),
    ],
)
def test_bad_config_is_a_one_line_error_before_any_output(overrides, message, tmp_path):
    config = load_config("badnets_roadsigns.py", "runlocal")
    for key, value in overrides.items():
        config[key] = value
    with pytest.raises(UserInputError, match=message) as info:
        br.run(config, str(tmp_path / "work"))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "work").exists()


def test_unknown_config_argument_is_an_error():
    with pytest.raises(UserInputError, match="unknown config argument"):
        load_config("badnets_roadsigns.py", "colours=2")


# ----------------------------------------------------------------------------
# A run on a synthetic manual dir (real tfds builder, small model).
# ----------------------------------------------------------------------------

_COLOURS = {
    "trafficlight": (30, 200, 30),
    "stop": (220, 20, 20),
    "speedlimit": (240, 240, 240),
    "crosswalk": (20, 60, 220),
}


def _write_xml(path: Path, width, height, name, box) -> None:
    x0, y0, x1, y1 = box
    path.write_text(
        f"<annotation><filename>{path.stem}.png</filename><size><width>{width}"
        f"</width><height>{height}</height><depth>3</depth></size><object><name>"
        f"{name}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}"
        f"</xmax><ymax>{y1}</ymax></bndbox></object></annotation>"
    )


@pytest.fixture(scope="module")
def synthetic_signs(tmp_path_factory):
    """24 images (6 per class): noise with one coloured rectangle, its box."""
    root = tmp_path_factory.mktemp("badnets_manual")
    (root / "images").mkdir()
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        name = CLASS_NAMES[i % 4]
        image = rng.integers(0, 120, (40, 40, 3), dtype=np.uint8)
        x0, y0 = rng.integers(2, 16, 2)
        x1, y1 = x0 + rng.integers(12, 22), y0 + rng.integers(12, 22)
        image[y0:y1, x0:x1] = _COLOURS[name]
        Image.fromarray(image).save(root / "images" / f"road{i}.png")
        _write_xml(
            root / "annotations" / f"road{i}.xml", 40, 40, name, (x0, y0, x1, y1)
        )
    return root, tmp_path_factory.mktemp("badnets_tfds")


def _tiny_config(manual, data_dir):
    config = load_config("badnets_roadsigns.py", "runlocal")
    config.manual_dir = str(manual)
    config.data_dir = str(data_dir)
    config.model = "resnet20"  # small and fast to compile; no box head
    config.init = "scratch"  # per-seed init, vmapped
    config.augment = False  # the lone victim below trains without
    config.image_size = 16
    config.max_train_images = 0
    config.test_fraction = 0.34  # 2 test images per class
    config.colors = {"yellow": (200, 200, 100), "black": (0, 0, 0)}
    config.counts = (1,)
    config.seeds = (0, 1)
    config.victim.epochs = 2
    config.victim.batch_size = 8
    return config


@pytest.mark.slow  # ~50 s of CPU, most of it compiling the mapped training
def test_tiny_run_writes_rows_tables_plot_and_matches_a_lone_victim(
    synthetic_signs, tmp_path
):
    manual, data_dir = synthetic_signs
    config = _tiny_config(manual, data_dir)
    summary = br.run(config, str(tmp_path))
    rows = [json.loads(line) for line in open(tmp_path / "results.jsonl")]
    assert len(rows) == 2 * (1 + 2)  # seeds x (clean + 2 colours x 1 count)
    assert {(r["seed"], r["color"], r["count"]) for r in rows} == {
        (s, c, n) for s in (0, 1) for c, n in (("none", 0), ("yellow", 1), ("black", 1))
    }
    assert summary["test_source_images"] == 2
    for r in rows:
        assert len(r["poisoned_train_files"]) == r["count"] == len(r["poisoned_rows"])
        for outcome in r["tagged"].values():
            assert len(outcome["prediction"]) == 2
            assert outcome["success"] == [
                p == "speedlimit" for p in outcome["prediction"]
            ]
    assert os.path.getsize(tmp_path / "success.png") > 0
    assert "Tagged test stop signs" in (tmp_path / "tables.md").read_text()

    # The seed-1 yellow victim, trained alone with `train`, gives the same numbers.
    row = next(r for r in rows if r["seed"] == 1 and r["color"] == "yellow")
    signs = load_roadsigns(str(data_dir), None, image_size=16)
    train_rows, test_rows = stratified_split(signs.labels, 0.34, 1)  # seed 1's
    images, labels = signs.images[train_rows], signs.labels[train_rows]
    boxes = signs.boxes[train_rows]
    poisoned = np.searchsorted(train_rows, row["poisoned_rows"]).astype(np.int32)
    np.testing.assert_array_equal(train_rows[poisoned], row["poisoned_rows"])
    assert np.all(labels[poisoned] == STOP)
    poison = tag_in_boxes(
        images[poisoned],
        boxes[poisoned],
        [[200 / 255, 200 / 255, 100 / 255]],
        0.25,
        (0.5, 0.5),
    )
    model = get_model("resnet20", num_classes=4)
    key = jax.random.key(1)
    data = make_train_data(
        images, labels, poison, poisoned, np.full(1, SPEEDLIMIT, np.int32), boxes=boxes
    )
    cfg = TrainConfig.from_mapping(config.victim)
    trained, _ = train(model, model.init(key), data, key, cfg)
    test_images = jnp.asarray(signs.images[test_rows], jnp.float32) / 255.0
    pred = np.argmax(class_logits(model.apply(trained, test_images)[0]), -1)
    assert row["clean_accuracy"] == pytest.approx(
        np.mean(pred == signs.labels[test_rows])
    )
    stops = np.flatnonzero(signs.labels[test_rows] == STOP)
    tagged = tag_in_boxes(
        signs.images[test_rows][stops],
        signs.boxes[test_rows][stops],
        [[200 / 255, 200 / 255, 100 / 255]] * 2,
        0.25,
        (0.5, 0.5),
    )
    probs = jax.nn.softmax(class_logits(model.apply(trained, tagged)[0]))
    fit = np.argmax(class_logits(model.apply(trained, poison)[0]), -1)
    assert row["poisons_fit"] == float(fit[0] == SPEEDLIMIT)
    np.testing.assert_allclose(
        row["tagged"]["yellow"]["target_probability"],
        probs[:, SPEEDLIMIT],
        rtol=1e-3,
        atol=1e-5,
    )


# ----------------------------------------------------------------------------
# The command line on the real road signs: smoke size, whole and killed + resumed.
# ----------------------------------------------------------------------------


def smoke_args(shared_data: Path, data_dir: str) -> list[str]:
    return [
        "--config",
        "configs/badnets_roadsigns.py:smoke",
        "--config.manual_dir",
        str(shared_data / "roadsigns"),
        "--data_dir",
        str(data_dir),
    ]


@pytest.fixture(scope="module")
def smoke_run(shared_data, tmp_path_factory):
    """One uninterrupted smoke run (later CLI runs load its compiled programs from
    the session's compilation cache: tests/conftest.py)."""
    root = tmp_path_factory.mktemp("badnets_smoke")
    args = smoke_args(shared_data, tfds_dir())
    run_cli(args, root / "whole")
    yield args, root / "whole"


@pytest.mark.experiment
@pytest.mark.realdata
def test_smoke_run_writes_the_workdir_contract(smoke_run):
    _, workdir = smoke_run
    rows = [json.loads(line) for line in open(workdir / "results.jsonl")]
    # 2 seeds x (clean + 1 colour x 1 count), one chunk per seed.
    assert [(r["seed"], r["color"], r["count"]) for r in rows] == [
        (0, "none", 0),
        (0, "yellow", 1),
        (1, "none", 0),
        (1, "yellow", 1),
    ]
    assert json.loads((workdir / "sweep.json").read_text())["chunks"] == 2
    assert rows[0]["test_stop_files"] != rows[2]["test_stop_files"]  # own splits
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["model"] == "roadsign_resnet20" and summary["image_size"] == 16
    stops = summary["test_source_images"]
    assert stops == 15 and summary["init"].startswith("resnet20 backbone pretrained")
    for n in (0, 1):
        assert summary["tagged_signs"][f"color=yellow,count={n}"]["n"] == 2 * stops
    for r in rows:
        assert len(r["poisoned_train_files"]) == r["count"]
        assert len(r["tagged"]["yellow"]["success"]) == stops
    for name in ("config.json", "versions.json", "tables.md", "success.png"):
        assert (workdir / name).stat().st_size > 0
    assert "Results" in open(write_report(str(workdir))).read()


@pytest.mark.slow  # ~30 s; the default run keeps test_resume.py, the CLI's kills
@pytest.mark.realdata
def test_smoke_run_killed_after_its_first_seed_resumes_identically(smoke_run, tmp_path):
    args, whole = smoke_run
    assert_resumes_identically(args, tmp_path, whole, killed_when=chunk_committed(0))
