"""Trials sharded over devices: 8 fake CPU devices, 2 processes x 4 devices.

Fake devices must be configured before JAX starts, so the multi-device checks run in
fresh Python subprocesses (`XLA_FLAGS=--xla_force_host_platform_device_count=N`).
Each compares the sharded computation with the same one on unsharded inputs.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import AxisType

from jaxpoison import UserInputError
from jaxpoison.distributed import maybe_initialize
from jaxpoison.sweep.sharding import (
    pad_to_multiple,
    replicate,
    shard_trials,
    to_host,
    trial_mesh,
)

REPO = Path(__file__).resolve().parents[1]


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_NUMPY_RANK_PROMOTION"] = "raise"
    paths = [str(REPO), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def _run(script: str, devices: int, *args: str, timeout: float = 240) -> str:
    """Runs `script` in a fresh Python with `devices` fake CPU devices."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        cwd=REPO,
        env=_env(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-6000:]
    return proc.stdout


# --- in this process (whatever devices it has) --------------------------------------


def test_pad_to_multiple_repeats_the_last_trial():
    specs = {"a": np.arange(5), "b": np.arange(10).reshape(5, 2)}
    padded, n_real = pad_to_multiple(specs, 4)
    assert n_real == 5
    np.testing.assert_array_equal(padded["a"], [0, 1, 2, 3, 4, 4, 4, 4])
    np.testing.assert_array_equal(padded["b"][5:], [[8, 9]] * 3)
    same, n = pad_to_multiple(specs, 5)
    assert n == 5 and all(len(v) == 5 for v in same.values())
    with pytest.raises(UserInputError, match="different lengths"):
        pad_to_multiple({"a": np.zeros(3), "b": np.zeros(4)}, 2)
    with pytest.raises(UserInputError, match="multiple of 0"):
        pad_to_multiple(specs, 0)


def test_trial_mesh_spans_all_devices_with_an_auto_axis():
    mesh = trial_mesh()
    assert mesh.axis_names == ("trials",)
    assert mesh.size == jax.device_count()
    assert mesh.axis_types == (AxisType.Auto,)


def test_shard_replicate_and_fetch_round_trip():
    mesh = trial_mesh()
    x = np.arange(2 * mesh.size, dtype=np.float32).reshape(mesh.size, 2)
    sharded = shard_trials({"x": x}, mesh)["x"]
    assert sharded.sharding.spec == jax.sharding.PartitionSpec("trials")
    np.testing.assert_array_equal(to_host(sharded), x)
    shared = replicate(x, mesh)
    assert shared.sharding.is_fully_replicated
    np.testing.assert_array_equal(to_host(shared), x)


def test_maybe_initialize_off_is_a_single_process():
    assert maybe_initialize(False) == (0, 1)


# --- 8 fake devices ---------------------------------------------------------------

TRAIN_SCRIPT = """
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxpoison.data import load_cifar10_sample
    from jaxpoison.models import head_variables, load_pretrained, shipped_weights
    from jaxpoison.sweep.sharding import replicate, shard_trials, trial_mesh
    from jaxpoison.victims import TrainConfig, make_train_data, train_vmapped

    assert jax.device_count() == 8, jax.devices()
    mesh = trial_mesh()
    model, variables = load_pretrained("resnet20", shipped_weights("resnet20"))
    sample = load_cifar10_sample("train")
    idx = np.concatenate([np.flatnonzero(sample.labels == c)[:10] for c in range(10)])
    images, labels = sample.images[idx], sample.labels[idx]

    T = 8
    rng = np.random.default_rng(0)
    rows = [rng.choice(len(labels), 2, replace=False) for _ in range(T)]
    trials = {
        "poison_images": rng.uniform(size=(T, 2, 32, 32, 3)).astype(np.float32),
        "poison_indices": np.stack(rows).astype(np.int32),
        "poison_labels": rng.integers(0, 10, (T, 2)).astype(np.int32),
        "keys": jax.random.split(jax.random.key(0), T),
    }
    config = TrainConfig(
        mode="linear",
        cold_start_head=True,
        optimizer="adam",
        learning_rate=0.01,
        epochs=2,
        batch_size=32,
    )

    def run(t, variables, images, labels):
        data = make_train_data(
            images, labels, t["poison_images"], t["poison_indices"], t["poison_labels"]
        )
        trained, metrics = train_vmapped(model, variables, data, t["keys"], config)
        return head_variables(trained), metrics

    expected = jax.device_get(run(trials, variables, images, labels))
    out = run(
        shard_trials(trials, mesh),
        replicate(variables, mesh),
        replicate(images, mesh),
        replicate(labels, mesh),
    )
    by_trial = NamedSharding(mesh, P("trials"))
    for leaf in jax.tree.leaves(out):
        assert leaf.sharding.is_equivalent_to(by_trial, leaf.ndim), leaf.sharding
        assert len(leaf.sharding.device_set) == 8
        assert {s.data.shape[0] for s in leaf.addressable_shards} == {1}
    got = jax.device_get(out)
    kernel = expected[0]["params"]["linear"]["kernel"]
    assert not np.allclose(kernel[0], kernel[1])  # trials differ: order matters
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        got,
        expected,
    )
    print("train_vmapped: 8 trials on 8 devices match the unsharded run")
"""


@pytest.mark.heavy
def test_train_vmapped_sharded_over_8_devices_matches_unsharded():
    assert "match the unsharded run" in _run(TRAIN_SCRIPT, 8)


CHUNKS_SCRIPT = """
    import os
    import sys

    import jax
    import numpy as np

    from jaxpoison import UserInputError
    from jaxpoison.sweep import run_chunks
    from jaxpoison.sweep.sharding import shard_trials, to_host, trial_mesh

    workdir = sys.argv[1]
    if len(sys.argv) > 2:  # one of several processes: join the cluster first
        coordinator, n, i = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        jax.distributed.initialize(coordinator, num_processes=n, process_id=i)
        assert (jax.process_index(), jax.process_count()) == (i, n)
        assert jax.local_device_count() == 8 // n
        workdir = os.path.join(workdir, f"process{i}")
    assert jax.device_count() == 8, jax.devices()
    mesh = trial_mesh()

    trial_fn = jax.jit(jax.vmap(lambda x, k: (2.0 * x).sum() + k))
    seen = []

    def trial_rows(chunk):
        seen.append(chunk["k"])
        values, ids = to_host((trial_fn(chunk["x"], chunk["k"]), chunk["id"]))
        return [{"id": int(i), "value": float(v)} for i, v in zip(ids, values)]

    rng = np.random.default_rng(0)
    specs = {
        "id": np.arange(13, dtype=np.int32),
        "x": rng.normal(size=(13, 3)).astype(np.float32),
        "k": np.arange(13, dtype=np.float32),
    }
    expected = [
        {"id": i, "value": float((2.0 * specs["x"][i]).sum() + i)} for i in range(13)
    ]
    rows = run_chunks(trial_rows, specs, 5, os.path.join(workdir, "sharded"), mesh=mesh)
    assert [r["id"] for r in rows] == list(range(13)), rows  # padding dropped
    np.testing.assert_allclose(
        [r["value"] for r in rows], [r["value"] for r in expected], rtol=1e-6
    )
    assert [len(k) for k in seen] == [8, 8, 8]  # chunks of 5, 5, 3 padded to 8
    assert all(len(k.sharding.device_set) == 8 for k in seen)
    chunk_dir = os.path.join(workdir, "sharded", "chunks")
    lines = [
        sum(1 for _ in open(os.path.join(chunk_dir, f)))
        for f in sorted(os.listdir(chunk_dir))
    ]
    assert lines == [5, 5, 3], lines

    def fail(chunk):
        raise AssertionError("a finished chunk was recomputed")

    again = run_chunks(fail, specs, 5, os.path.join(workdir, "sharded"), mesh=mesh)
    assert again == rows
    plain = run_chunks(trial_rows, specs, 5, os.path.join(workdir, "plain"))
    assert [r["id"] for r in plain] == list(range(13))
    np.testing.assert_allclose(
        [r["value"] for r in plain], [r["value"] for r in rows], rtol=1e-6
    )
    try:
        shard_trials({"x": np.zeros(5)}, mesh)
    except UserInputError:
        pass
    else:
        raise AssertionError("5 trials were split over 8 devices")
    print(f"process {jax.process_index()} of {jax.process_count()}: chunks ok")
"""


def test_run_chunks_on_8_devices_pads_and_drops(tmp_path):
    assert "process 0 of 1: chunks ok" in _run(CHUNKS_SCRIPT, 8, str(tmp_path))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_run_chunks_over_2_processes_with_4_devices_each(tmp_path):
    """A real multi-controller run on CPU (gloo collectives): the mesh spans both
    processes' devices; every process gets every row."""
    coordinator = f"localhost:{_free_port()}"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                textwrap.dedent(CHUNKS_SCRIPT),
                str(tmp_path),
                coordinator,
                "2",
                str(i),
            ],
            cwd=REPO,
            env=_env(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, (out, err)) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, out + err[-6000:]
        assert f"process {i} of 2: chunks ok" in out, out + err[-6000:]


PER_DEVICE_SCRIPT = """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxpoison.models import load_pretrained, shipped_weights
    from jaxpoison.sweep.sharding import per_device, shard_trials, trial_mesh
    from jaxpoison.victims import TrainConfig, cache_features, make_train_data

    mesh = trial_mesh()
    assert mesh.size == 8

    def halvings(scale, x):
        # A while loop per trial, running a different number of steps for each.
        def one(v):
            halve = lambda c: (c[0] / 2, c[1] + 1)
            return jax.lax.while_loop(lambda c: c[0] > 1.0, halve, (v * scale, 0))[1]
        return jax.lax.map(one, x)

    x = np.linspace(1.0, 900.0, 16).astype(np.float32)
    fn = jax.jit(per_device(halvings, mesh, trial_args=(False, True)))
    out = fn(np.float32(3.0), shard_trials(x, mesh))
    assert len(out.sharding.device_set) == 8, out.sharding
    looped = [int(np.ceil(np.log2(3.0 * v))) if 3.0 * v > 1 else 0 for v in x]
    np.testing.assert_array_equal(np.asarray(out), looped)

    model, variables = load_pretrained("resnet20", shipped_weights("resnet20"))
    images = np.random.default_rng(0).integers(0, 256, (13, 32, 32, 3), np.uint8)
    data = make_train_data(images, np.zeros(13, np.int32))
    config = TrainConfig(mode="linear", augment=True, cache_augmented_features=True)
    one = cache_features(model, variables, data, config).features
    split = cache_features(model, variables, data, config, mesh=mesh).features
    assert split.shape == one.shape == (13, 162, 64), split.shape
    np.testing.assert_allclose(np.asarray(split), np.asarray(one), rtol=1e-5, atol=1e-5)
    print("per-device results match")
"""


def test_per_device_runs_while_loops_and_feature_caches_on_8_devices():
    """shard_map'd trials (a while loop each) equal the looped closed form, and the
    crop/flip feature cache split over 8 devices (13 images, padded) equals one
    device's."""
    assert "per-device results match" in _run(PER_DEVICE_SCRIPT, 8)
