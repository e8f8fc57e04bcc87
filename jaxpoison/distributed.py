"""Multi-host start-up: `jax.distributed.initialize()` behind the `--distributed` flag.

On a Cloud TPU VM slice (`launch/tpu_vm.sh run`), the same command runs on every
worker; `jax.distributed.initialize()` finds the coordinator, the number of processes
and this process's id from the TPU environment (also Slurm and Open MPI), after which
`jax.devices()` lists every host's devices and a `trial_mesh()` spans them all. It
must run before anything else touches JAX devices, so the CLI calls it first.
"""

from __future__ import annotations

import os

import jax

MAX_CPU_DEVICES = 8


def maybe_initialize(enabled: bool) -> tuple[int, int]:
    """Joins the multi-host JAX cluster when `enabled`; prints where this process is.

    Returns:
      (process index, process count); (0, 1) when not `enabled`, without touching
      JAX's backends (so flags such as `jax_num_cpu_devices` may still be set).
    """
    if not enabled:
        return 0, 1
    if not jax.distributed.is_initialized():
        jax.distributed.initialize()
    print(
        f"jax.distributed: process {jax.process_index()} of {jax.process_count()}, "
        f"{jax.local_device_count()} local of {jax.device_count()} global "
        f"{jax.default_backend()} devices",
        flush=True,
    )
    return jax.process_index(), jax.process_count()


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def split_cpu_into_devices(count: int = 0) -> int:
    """Makes JAX's CPU backend one device per core (`count` = 0: up to 8 cores).

    XLA:CPU runs many convolutions on one thread (on this project's 2-core machines
    ResNet-20's 32- and 64-channel convolutions take the same time on one core as
    on two), so one device per core, with trials split over a mesh of them, is how
    a CPU host uses all its cores (`python benchmarks/per_device.py`: 1.4x on 2
    cores; `python benchmarks/crafting.py`: per-core crafting 1.4-1.8x one device).
    Must run before JAX's backends start; does nothing when XLA_FLAGS already sets
    `--xla_force_host_platform_device_count`, and affects only the CPU backend.

    Returns:
      the number of CPU devices requested (0 when left to XLA_FLAGS).
    """
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return 0
    count = count or min(cpu_cores(), MAX_CPU_DEVICES)
    jax.config.update("jax_num_cpu_devices", count)
    return count
