"""Multi-host start-up: `jax.distributed.initialize()` behind the `--distributed` flag.

On a Cloud TPU VM slice (`launch/tpu_vm.sh run`), the same command runs on every
worker; `jax.distributed.initialize()` finds the coordinator, the number of processes
and this process's id from the TPU environment (also Slurm and Open MPI), after which
`jax.devices()` lists every host's devices and a `trial_mesh()` spans them all. It
must run before anything else touches JAX devices, so the CLI calls it first.
"""

from __future__ import annotations

import jax


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
