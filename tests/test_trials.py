"""The trial engine (`run_trials`) and the workdir contract (`open_workdir`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxpoison.errors import UserInputError
from jaxpoison.sweep import Trial, open_workdir, run_trials, trial_keys, trial_seeds
from jaxpoison.sweep.keys import named_key
from jaxpoison.sweep.workdir import first_difference, workdir_lock
from tests.cli_runs import REPO, cli_env


def least_squares(shared, spec):
    """A real vmapped trial: a few gradient steps on data drawn from the seed."""
    x = shared["x"]

    def one(seed, scale):
        w_true = scale * jax.random.normal(jax.random.key(seed), (x.shape[1],))
        y = x @ w_true
        w = jnp.zeros_like(w_true)
        for _ in range(3):
            w = w - 0.1 * jax.grad(lambda w: jnp.mean((x @ w - y) ** 2))(w)
        return {"w": w, "loss": jnp.mean((x @ w - y) ** 2)}

    return jax.vmap(one)(spec["seed"], spec["scale"])


def loss_row(spec, out):
    return {
        "seed": int(spec["seed"]),
        "name": str(spec["name"]),
        "loss": float(out["loss"]),
    }


SHARED = {"x": np.linspace(-1.0, 1.0, 24, dtype=np.float32).reshape(6, 4)}
SPECS = {
    "seed": np.arange(7, dtype=np.int32),
    "scale": np.linspace(0.5, 2.0, 7).astype(np.float32),
    "name": np.array([f"trial{i}" for i in range(7)]),
}


def test_rows_equal_a_loop_over_single_trials(tmp_path):
    rows = run_trials(
        Trial(least_squares, loss_row), SHARED, SPECS, chunk_size=3, workdir=tmp_path
    )
    for i, row in enumerate(rows):
        one = {k: v[i : i + 1] for k, v in SPECS.items() if k != "name"}
        expected = float(least_squares(SHARED, one)["loss"][0])
        assert row["seed"] == i and row["name"] == f"trial{i}"
        np.testing.assert_allclose(row["loss"], expected, rtol=1e-6)
    assert (tmp_path / "results.jsonl").read_text().count("\n") == 7


def test_a_sweep_traces_its_trial_once_per_chunk_shape(tmp_path):
    """Chunks of one shape share one compiled program (chex counts the traces):
    6 trials in chunks of 3 trace once; 7 in chunks of 3 twice, the ragged last
    chunk of 1 being a second shape (one device pads nothing)."""
    import chex

    chex.clear_trace_counter()
    six = {k: v[:6] for k, v in SPECS.items()}
    run = chex.assert_max_traces(least_squares, n=1)
    rows = run_trials(Trial(run, loss_row), SHARED, six, chunk_size=3, workdir=tmp_path)
    assert len(rows) == 6
    chex.clear_trace_counter()  # counts are kept per function
    run = chex.assert_max_traces(least_squares, n=2)
    trial = Trial(run, loss_row)
    rows = run_trials(trial, SHARED, SPECS, chunk_size=3, workdir=tmp_path / "7")
    assert len(rows) == 7


def test_a_trial_may_give_several_rows(tmp_path):
    def two_rows(spec, out):
        return [{"seed": int(spec["seed"]), "k": k} for k in range(2)]

    rows = run_trials(
        Trial(least_squares, two_rows), SHARED, SPECS, chunk_size=4, workdir=tmp_path
    )
    assert [(r["seed"], r["k"]) for r in rows] == [
        (i, k) for i in range(7) for k in (0, 1)
    ]


def test_save_runs_per_chunk_before_its_rows_are_committed(tmp_path):
    saved = []

    def save(index, chunk, outputs, workdir):
        assert not (tmp_path / "chunks" / f"{index:05d}.jsonl").exists()
        saved.append((index, chunk["seed"].tolist(), outputs["w"].shape))

    trial = Trial(least_squares, loss_row, save)
    run_trials(trial, SHARED, SPECS, chunk_size=3, workdir=tmp_path)
    assert saved == [(0, [0, 1, 2], (3, 4)), (1, [3, 4, 5], (3, 4)), (2, [6], (1, 4))]


def test_a_rerun_computes_nothing_and_returns_the_same_rows(tmp_path):
    calls = []

    def counted(shared, spec):
        calls.append(1)  # runs once per trace, i.e. per chunk shape
        return least_squares(shared, spec)

    first = run_trials(
        Trial(counted, loss_row), SHARED, SPECS, chunk_size=3, workdir=tmp_path
    )
    calls.clear()
    again = run_trials(
        Trial(counted, loss_row), SHARED, SPECS, chunk_size=3, workdir=tmp_path
    )
    assert again == first and calls == []


MESH_SCRIPT = """
    import json, sys
    import jax
    import numpy as np
    from jaxpoison.sweep import Trial, run_trials
    from jaxpoison.sweep.sharding import trial_mesh
    from tests.test_trials import SHARED, SPECS, least_squares, loss_row

    assert jax.device_count() == 8
    rows = run_trials(Trial(least_squares, loss_row), SHARED, SPECS, chunk_size=5,
                      workdir=sys.argv[1], mesh=trial_mesh())
    print(json.dumps(rows))
"""


def test_eight_devices_give_the_rows_of_one(tmp_path):
    """Chunks of 5 trials padded to 8 devices: same rows as one device."""
    one = run_trials(
        Trial(least_squares, loss_row), SHARED, SPECS, chunk_size=5, workdir=tmp_path
    )
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(MESH_SCRIPT), str(tmp_path / "mesh")],
        cwd=REPO,
        env=cli_env(devices=8),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    eight = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["seed"] for r in eight] == list(range(7))
    np.testing.assert_allclose(
        [r["loss"] for r in eight], [r["loss"] for r in one], rtol=1e-6
    )


def test_trial_seeds_lay_out_streams():
    np.testing.assert_array_equal(trial_seeds(3, 4), [3, 4, 5, 6])
    np.testing.assert_array_equal(
        trial_seeds(2, 2, stride=1000, offset=1), [2001, 2002]
    )
    keys = trial_keys(jnp.asarray(trial_seeds(0, 2)))
    np.testing.assert_array_equal(
        jax.random.key_data(keys[1]), jax.random.key_data(jax.random.key(1))
    )
    import zlib

    np.testing.assert_array_equal(
        jax.random.key_data(named_key("cell", 0, 2)),
        jax.random.key_data(jax.random.key(zlib.crc32(b"cell|0|2"))),
    )


# --- the workdir contract -----------------------------------------------------------


def _config(**fields):
    config = ml_collections.ConfigDict({"experiment": "x", "seed": 0, "victim": {}})
    config.victim.epochs = 10
    config.update(fields)
    return config


def test_workdir_gets_config_and_versions(tmp_path):
    with open_workdir(_config(), str(tmp_path / "w")):
        pass
    config = json.loads((tmp_path / "w" / "config.json").read_text())
    versions = json.loads((tmp_path / "w" / "versions.json").read_text())
    assert config["victim"] == {"epochs": 10}
    assert {"python", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint"} <= set(
        versions
    )


def test_workdir_of_another_config_is_refused_naming_the_field(tmp_path):
    with open_workdir(_config(), str(tmp_path)):
        pass
    other = _config()
    other.victim.epochs = 1
    with pytest.raises(UserInputError, match="victim.epochs"):
        with open_workdir(other, str(tmp_path)):
            pass


def test_device_count_is_not_part_of_the_config_identity(tmp_path):
    with open_workdir(_config(cpu_devices=0), str(tmp_path)):
        pass
    with open_workdir(_config(cpu_devices=1), str(tmp_path)):
        pass


def test_second_run_into_a_locked_workdir_stops(tmp_path):
    with workdir_lock(str(tmp_path)):
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from jaxpoison.sweep.workdir import workdir_lock\n"
                "with workdir_lock(sys.argv[1]): pass",
                str(tmp_path),
            ],
            cwd=REPO,
            env=cli_env(),
            capture_output=True,
            text=True,
        )
    assert proc.returncode != 0
    assert f"in use by another run (pid {os.getpid()})" in proc.stderr


def test_workdir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(UserInputError, match="is a file"):
        with open_workdir(_config(), str(path)):
            pass


def test_refused_run_leaves_no_new_workdir(tmp_path):
    with pytest.raises(UserInputError):
        with open_workdir(_config(), str(tmp_path / "new")):
            raise UserInputError("unknown model")
    assert not (tmp_path / "new").exists()


def test_first_difference_names_nested_fields():
    assert first_difference({"a": {"b": 1}}, {"a": {"b": 2}}) == "a.b"
    assert first_difference({"a": 1}, {"a": 1, "c": 2}) == "c"
    assert first_difference({"a": [1, 2]}, {"a": [1, 2]}) is None


def test_result_files_are_readable_as_the_umask_says(tmp_path):
    from jaxpoison.results import write_json

    old = os.umask(0o022)
    try:
        write_json(str(tmp_path / "s.json"), {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "s.json").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"seed": -1}, "config field seed is -1; it cannot be negative"),
        ({"victim": {"learning_rate": float("nan")}}, "victim.learning_rate is nan"),
        ({"poison_counts": (1, float("inf"))}, "poison_counts[1] is inf"),
    ],
)
def test_unusable_config_values_are_refused(tmp_path, fields, message):
    with pytest.raises(UserInputError, match=re.escape(message)):
        with open_workdir(_config(**fields), str(tmp_path / "w")):
            pass
    assert not (tmp_path / "w").exists()


def test_a_non_finite_output_stops_the_sweep_naming_the_trial(tmp_path):
    specs = {**SPECS, "scale": SPECS["scale"].copy()}
    specs["scale"][4] = np.nan  # trial 4 reads NaN
    with pytest.raises(
        UserInputError, match=r"trial 4 \(seed=4, scale=nan\) .*\['loss'\]"
    ):
        run_trials(
            Trial(least_squares, loss_row),
            SHARED,
            specs,
            chunk_size=3,
            workdir=tmp_path,
        )
    assert sorted(p.name for p in (tmp_path / "chunks").iterdir()) == ["00000.jsonl"]
