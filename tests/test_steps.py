"""sweep/steps.py: a resumed step loop equals an uninterrupted one (also after a
damaged state save), and a saved unit is computed once, then loaded."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpoison.sweep import eval_points, key_chain, resume_steps, saved_arrays
from jaxpoison.sweep.chunks import checkpoint_manager
from jaxpoison.sweep.steps import newest_saved_state, save_state

POINTS = eval_points(5, 2)  # 0, 2, 4, 5


class Killed(Exception):
    """Stands in for a SIGKILL between a state save and its rows' commit."""


def run_loop(workdir, calls: list, kill_at: int | None = None) -> list[dict]:
    """A toy loop: state x -> 0.5 x + s, aux = x; rows = the point, x and the
    window's aux sum. `calls` records the steps computed."""

    def step(state, s: int):
        calls.append(s)
        return {"x": 0.5 * state["x"] + s}, {"x": state["x"]}

    def rows(i, point, state, window):
        if i == kill_at:
            raise Killed
        x = float(state["x"][0])
        return [{"point": point, "x": x, "window": [float(a["x"][0]) for a in window]}]

    state0 = {"x": jnp.arange(3.0)}
    return resume_steps(step, state0, POINTS, rows, str(workdir))


def test_eval_points_are_every_n_steps_and_the_last():
    assert eval_points(60, 20).tolist() == [0, 20, 40, 60]
    assert POINTS.tolist() == [0, 2, 4, 5]
    assert eval_points(0, 3).tolist() == [0]


def test_key_chain_gives_the_keys_a_host_loop_splits():
    key = jax.random.key(7)
    expected = []
    for _ in range(5):
        key, k = jax.random.split(key)
        expected.append(jax.random.key_data(k))
    got = key_chain(jax.random.key(7), 5)
    np.testing.assert_array_equal(jax.random.key_data(got), np.stack(expected))


def test_uninterrupted_loop_rows_and_saves(tmp_path):
    calls = []
    rows = run_loop(tmp_path, calls)
    assert calls == [0, 1, 2, 3, 4]
    assert [r["point"] for r in rows] == [0, 2, 4, 5]
    assert rows[1]["window"] == [0.0, 0.0] and rows[1]["x"] == 1.0  # 0 -> 0 -> 1
    manager = checkpoint_manager(str(tmp_path / "state"))
    assert manager.all_steps() == [4, 5]  # the last two kept


@pytest.mark.parametrize("damaged", [False, True])
def test_resumed_loop_equals_an_uninterrupted_one(tmp_path, damaged):
    whole = run_loop(tmp_path / "whole", [])
    resumed = tmp_path / "resumed"
    calls = []
    with pytest.raises(Killed):  # after the state at step 4 is saved
        run_loop(resumed, calls, kill_at=2)
    assert calls == [0, 1, 2, 3]
    if damaged:  # the newest save usable for the resume (step 2) is truncated
        for path in (resumed / "state" / "checkpoints" / "2").rglob("*"):
            if path.is_file():
                path.write_bytes(b"")
    calls = []
    assert run_loop(resumed, calls) == whole
    # From the state saved at 2 (or from step 0 when that save is damaged).
    assert calls == ([0, 1] if damaged else []) + [2, 3, 4]
    assert (resumed / "results.jsonl").read_bytes() == (
        tmp_path / "whole" / "results.jsonl"
    ).read_bytes()


def test_a_damaged_save_falls_back_to_an_older_one(tmp_path):
    states = {step: {"w": jnp.full((3,), float(step))} for step in (2, 4)}
    manager = checkpoint_manager(str(tmp_path))
    for step, state in states.items():
        save_state(manager, step, state)
    for path in (tmp_path / "checkpoints" / "4").rglob("*"):
        if path.is_file():
            path.write_bytes(b"")  # truncated by a crash
    step, state = newest_saved_state(manager, 4, states[2])
    assert step == 2 and manager.all_steps() == [2]
    np.testing.assert_array_equal(state["w"], states[2]["w"])
    assert newest_saved_state(manager, 1, states[2]) == (0, None)


def test_saved_arrays_are_computed_once_then_loaded(tmp_path):
    path = str(tmp_path / "units" / "unit_000.npz")
    made = []

    def make():
        made.append(1)
        return {"a": np.arange(4.0), "text": np.array("history")}

    first = saved_arrays(path, make)
    again = saved_arrays(path, make)
    assert len(made) == 1
    np.testing.assert_array_equal(first["a"], again["a"])
    assert str(again["text"]) == "history"
