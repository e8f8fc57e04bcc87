"""One victim's batch split over devices trains the same victim as one device.

In float64, so that the only difference, the order of float sums, stays ~1e-15 after
the 6 steps instead of growing to ~1e-4 in float32.

Fake CPU devices must be configured before JAX starts, so each check runs in a fresh
Python with 2 of them (`XLA_FLAGS=--xla_force_host_platform_device_count=2`).
"""

from __future__ import annotations

import jax
import pytest

from jaxpoison.victims import TrainConfig, data_parallel
from tests.cli_runs import run_python

SCRIPT = """
    import jax
    import numpy as np

    jax.config.update("jax_enable_x64", True)  # so that summation order is ~1e-15

    from jaxpoison.data import load_cifar10_sample
    from jaxpoison.models import load_pretrained, shipped_weights
    from jaxpoison.victims import TrainConfig, data_parallel, make_train_data, train

    assert jax.device_count() == 2, jax.devices()
    model, variables = load_pretrained("resnet20", shipped_weights("resnet20"))
    variables = jax.tree.map(lambda a: a.astype(np.float64), variables)
    sample = load_cifar10_sample("train")
    data = make_train_data(sample.images[:96], sample.labels[:96])
    runs = {}
    for split in (True, False):
        config = TrainConfig(
            batch_size=32, epochs=2, learning_rate=0.05, weight_decay=5e-4,
            augment=True, split_batch=split,
        )
        assert (data_parallel.batch_mesh(config) is not None) == split
        runs[split] = train(model, variables, data, jax.random.key(0), config)
    (split_vars, split_metrics), (one_vars, one_metrics) = runs[True], runs[False]
    moved = max(
        float(np.abs(np.asarray(a) - np.asarray(b)).max())
        for a, b in zip(jax.tree.leaves(one_vars), jax.tree.leaves(variables))
    )
    assert moved > 1e-3, moved  # training changed the weights
    for a, b in zip(jax.tree.leaves(split_vars), jax.tree.leaves(one_vars)):
        assert a.dtype == np.float64, a.dtype
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-12)
    for name in ("loss", "accuracy"):
        np.testing.assert_allclose(split_metrics[name], one_metrics[name], rtol=1e-9)
    leaf = jax.tree.leaves(split_vars)[0]
    assert leaf.sharding.device_set == {jax.devices()[0]}, leaf.sharding
    print("ok")
"""


@pytest.mark.heavy
def test_split_batch_trains_the_same_victim_as_one_device():
    run_python(SCRIPT, devices=2)


@pytest.mark.skipif(jax.device_count() > 1, reason="this process has several devices")
def test_one_device_is_not_split():
    assert data_parallel.batch_mesh(TrainConfig()) is None


def test_batch_not_divisible_or_linear_or_dp_sgd_is_not_split(monkeypatch):
    monkeypatch.setattr(jax, "local_devices", lambda: [jax.devices()[0]] * 2)
    assert data_parallel.batch_mesh(TrainConfig(batch_size=3)) is None
    assert data_parallel.batch_mesh(TrainConfig(mode="linear")) is None
    assert data_parallel.batch_mesh(TrainConfig(dp_clip_norm=1.0)) is None
    assert data_parallel.batch_mesh(TrainConfig(split_batch=False)) is None
