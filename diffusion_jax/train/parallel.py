"""Device mesh, shardings and multi-host start-up for data-parallel and FSDP training.

The trainer uses one 2-D `jax.sharding.Mesh` over every device of every host,
with axes ("data", "fsdp") of sizes (num_devices / fsdp, fsdp), where fsdp is
`config.parallel.fsdp` (written with `jax.jit` and shardings as in big_vision):

* the global batch is split along its leading dimension over both axes
  (`NamedSharding(mesh, P(("data", "fsdp")))`), so each device sees
  batch / num_devices examples;
* with fsdp = 1 (the default) the train state (params, EMA params, optimiser
  state) is replicated (`NamedSharding(mesh, P())`) and XLA inserts the
  all-reduce of the gradients: plain data parallelism;
* with fsdp > 1 every array of the state is split over "fsdp" by
  `fsdp_spec` (fully sharded data parallelism, ZeRO-3): along its largest
  axis whose length fsdp divides, or replicated when it has fewer than
  `FSDP_MIN_SIZE` elements or no such axis. Each device then holds about
  1 / fsdp of the parameters, Adam moments and EMA; XLA all-gathers a
  layer's parameters where the forward and backward passes need them and
  reduces the gradients onto the parameters' sharding (on the CPU backend an
  all-reduce of the full gradient, then this device's slice), which the
  optimiser update and the EMA then keep (they are elementwise).

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
FSDP_AXIS = "fsdp"
# Arrays with fewer elements stay replicated under FSDP (biases, norm scales, the
# step): splitting them saves little memory and costs a collective each.
FSDP_MIN_SIZE = 2**12

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


def make_mesh(devices: list | None = None, fsdp: int = 1) -> Mesh:
    """A (data, fsdp) mesh of shape (len(devices) / fsdp, fsdp) over `devices`
    (default: every device of every host).

    Devices are in `jax.devices()` order, i.e. grouped by process, with "fsdp"
    the faster-varying axis: an fsdp group is a run of consecutive devices
    (within one host when fsdp divides its device count, across hosts when
    fsdp is larger), and process i holds a contiguous block of the global batch.
    """
    devices = jax.devices() if devices is None else devices
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"config.parallel.fsdp must be a divisor of the device count "
                         f"{len(devices)}, got {fsdp!r}")
    return Mesh(np.asarray(devices).reshape(len(devices) // fsdp, fsdp), (DATA_AXIS, FSDP_AXIS))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over both mesh axes (every device its own rows)."""
    return NamedSharding(mesh, P((DATA_AXIS, FSDP_AXIS)))


def fsdp_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """The FSDP rule for one array of `shape`: split along its largest axis
    whose length `fsdp` divides (the first such axis on a tie); replicated
    (P()) when fsdp is 1, the array has fewer than FSDP_MIN_SIZE elements, or
    no axis divides."""
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE:
        return P()
    axes = [i for i in np.argsort([-n for n in shape], kind="stable") if shape[i] % fsdp == 0]
    if not axes:
        return P()
    spec = [None] * len(shape)
    spec[axes[0]] = FSDP_AXIS
    return P(*spec)


def state_sharding(mesh: Mesh, abstract_state: Any) -> Any:
    """Per-leaf NamedShardings of a state pytree (arrays or ShapeDtypeStructs)
    under `fsdp_spec` with the mesh's fsdp size (all replicated for fsdp = 1)."""
    fsdp = mesh.shape[FSDP_AXIS]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp)), abstract_state)


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
    """Global arrays -> numpy, on every process. Replicated arrays are read from
    a local copy; sharded ones (FSDP state) are gathered, which on several hosts
    is a collective: every process must call it."""
    def one(a):
        if not isinstance(a, jax.Array):
            return np.asarray(a)
        if a.is_fully_replicated:
            return np.asarray(a.addressable_data(0))
        if a.is_fully_addressable:
            return np.asarray(a)
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return jax.tree.map(one, x)
