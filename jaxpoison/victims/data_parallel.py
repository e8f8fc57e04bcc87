"""One victim on every local device: its batch split over a 1-D "batch" mesh.

A sweep keeps every device busy with its own trials (sweep/sharding.py). A single
training run (`victims.train` called outside any trace) has only one victim; on a
CPU split into one device per core (`distributed.split_cpu_into_devices`, the CLI's
default) it would run on one core. Instead each step's batch is split over the
local devices: the variables and training set are replicated, the augmented batch
is constrained to be split along its examples, and XLA's partitioner turns every
batch-wide reduction (BatchNorm's statistics, the mean loss, the gradients) into
an all-reduce. The result is the same training up to float summation order
(`tests/test_data_parallel.py`).

`models/conv.py`'s weight gradient runs as a loop over blocks of images, which the
partitioner cannot split (it would all-gather the batch and compute the whole
gradient on every device); `conv.split_weight_gradients(mesh)` makes it an explicit
per-device sum instead. Measured on this project's 2-core CPU, ResNet-20 fine-tuning
at batch 128 (`python benchmarks/victim_speed.py`): README's speed section.
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpoison.models import conv
from jaxpoison.victims.config import TrainConfig

BATCH = "batch"


def batch_mesh(config: TrainConfig) -> Mesh | None:
    """A "batch" mesh over this process's devices, or None to train on one device.

    Only with `config.split_batch`, for end-to-end training on CPU (the
    convolution rewrites this relies on are CPU-only; accelerator hosts were not
    measured), in a single process, with more than one local device and a batch
    size they divide. DP-SGD's per-example gradients stay on one device.
    """
    devices = jax.local_devices()
    if (
        not config.split_batch
        or len(devices) < 2
        or jax.process_count() > 1
        or jax.default_backend() != "cpu"
        or config.mode != "end_to_end"
        or config.dp_clip_norm
        or config.batch_size % len(devices)
    ):
        return None
    return jax.make_mesh(
        (len(devices),), (BATCH,), axis_types=(AxisType.Auto,), devices=devices
    )


def replicate(tree, mesh: Mesh):
    """Every array leaf of `tree` copied to each device of `mesh`."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def split_examples(x, mesh: Mesh | None):
    """`x` constrained to be split along its leading (example) axis over `mesh`."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(BATCH)))


def traced_split(fn, mesh: Mesh | None):
    """`fn` traced with its weight gradients summed per device over `mesh`."""
    if mesh is None:
        return fn

    @functools.wraps(fn)
    def wrapped(*args):
        with conv.split_weight_gradients(mesh):
            return fn(*args)

    return wrapped
