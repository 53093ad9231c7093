"""Device mesh, shardings and multi-host start-up for data-parallel training.

The trainer uses one 1-D `jax.sharding.Mesh` over every device of every host,
with a single axis named "data" (the data parallelism of `pmap`, written with
`jax.jit` and shardings as in big_vision):

* the global batch is split along its leading dimension over "data"
  (`NamedSharding(mesh, P("data"))`), so each device sees batch / num_devices
  examples;
* the train state (params, EMA params, optimiser state) is replicated
  (`NamedSharding(mesh, P())`); XLA inserts the all-reduce of the gradients.

On several hosts each process feeds only the rows of the global batch that
its own devices hold (`jax.make_array_from_process_local_data`).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"

# Environment variables that ask for `jax.distributed.initialize()` without a
# config change (JAX itself reads JAX_COORDINATOR_ADDRESS).
_ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
_ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
_ENV_PROCESS_ID = "JAX_PROCESS_ID"


def maybe_initialize_distributed(parallel_config: Any) -> bool:
    """Calls `jax.distributed.initialize()` when the config or environment asks.

    Asked for when `parallel_config.distributed` is True, or when the
    environment names a coordinator ($JAX_COORDINATOR_ADDRESS). Explicit
    config values (coordinator_address, num_processes, process_id) win over
    $JAX_COORDINATOR_ADDRESS / $JAX_NUM_PROCESSES / $JAX_PROCESS_ID; values
    left unset are auto-detected by JAX (SLURM, TPU pods, ...). Must run before
    anything touches the devices. Idempotent. Returns True when this process
    is part of a multi-process job.
    """
    wanted = bool(parallel_config.distributed) or bool(os.environ.get(_ENV_COORDINATOR))
    if not wanted:
        return False
    if jax.distributed.is_initialized():
        return True

    def pick(value, env, cast):
        if value not in (None, "", -1):
            return cast(value)
        return cast(os.environ[env]) if os.environ.get(env) else None

    jax.distributed.initialize(
        coordinator_address=pick(parallel_config.coordinator_address, _ENV_COORDINATOR, str),
        num_processes=pick(parallel_config.num_processes, _ENV_NUM_PROCESSES, int),
        process_id=pick(parallel_config.process_id, _ENV_PROCESS_ID, int),
    )
    return True


def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh with axis "data" over `devices` (default: every device of every host).

    Devices are in `jax.devices()` order, i.e. grouped by process, so process
    i holds a contiguous block of the global batch.
    """
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the "data" axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding under which every device holds the whole array."""
    return NamedSharding(mesh, P())


def global_batch(mesh: Mesh, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Assembles the global, batch-sharded arrays from this process's rows.

    `local_batch` holds batch_size // process_count rows on each process; the
    result has batch_size rows, laid out process 0's rows first.
    """
    sharding = batch_sharding(mesh)
    out = {}
    for name, x in local_batch.items():
        x = np.asarray(x)
        global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
        out[name] = jax.make_array_from_process_local_data(sharding, x, global_shape)
    return out


def replicate_array(mesh: Mesh, x: Any) -> Any:
    """A host value identical on every process -> a replicated global array (pytree-wise)."""
    sharding = replicated_sharding(mesh)
    return jax.tree.map(
        lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a), np.shape(a)), x
    )



def to_host(x: Any) -> Any:
    """Replicated (or addressable) global arrays -> numpy, on every process."""
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)) if isinstance(a, jax.Array) else np.asarray(a), x)
