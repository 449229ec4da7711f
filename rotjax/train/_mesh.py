"""Data parallelism with `jax.sharding`: one code path for 1 CPU, 8 GPUs or a TPU pod slice.

The mesh has one axis, ``"data"``, over every device of every process (`jax.devices()`). A
global batch is split along its leading axis over that axis; params and optimizer state are
replicated. ``jax.jit`` then compiles the *global* program, inserting the gradient all-reduce
itself, so a step means the same thing on any number of devices.

Multi-host (several processes, e.g. a TPU pod slice or several GPU nodes): every process runs
the same script; call `initialize_distributed` first (the experiment scripts do when
``ROTJAX_DISTRIBUTED=1`` or ``--distributed``). Each process then loads only its own rows of
each global batch (`process_rows`) and `shard_batch` assembles the global array from the
per-process pieces. On one process this is the same code with ``process_count() == 1``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices`` (default: all devices, all processes)."""
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("data_mesh needs at least one device")
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of params and optimizer state: a full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of batches: the leading (example) axis split over ``"data"``."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, name: str = "global batch size") -> None:
    """Raises ``ValueError`` (naming the argument ``name``) unless ``batch_size`` splits evenly
    over devices and processes."""
    n = mesh.devices.size
    if batch_size < 1 or batch_size % n or batch_size % jax.process_count():
        raise ValueError(
            f"{name} {batch_size} must be a positive multiple of the {n} devices "
            f"of the mesh (and of the {jax.process_count()} processes)"
        )


def process_rows(batch_size: int) -> slice:
    """This process's rows of a global batch of ``batch_size`` examples."""
    per_process = batch_size // jax.process_count()
    start = jax.process_index() * per_process
    return slice(start, start + per_process)


def shard_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays, split over the mesh, from this process's rows of a batch.

    Args:
        local: This process's rows (all rows on a single process) of every batch array.
        mesh: The data mesh.

    Returns:
        A dict of global ``jax.Array`` with `batch_sharding`.
    """
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()
    }


def replicate(tree: Any, mesh: Mesh) -> Any:
    """A replicated copy of ``tree`` on the mesh, always in new buffers, so that donating the
    result (as `rotjax.train.fit` does) can never invalidate the caller's arrays.

    (``jax.device_put(..., may_alias=False)`` is not enough: on a multi-device mesh it reuses a
    device-0 input buffer as the replica on device 0; a jitted copy writes every replica.
    Arrays committed to another placement, which jit refuses if its devices are not the mesh's
    in the mesh's order, are moved there first; numpy and uncommitted arrays go straight in.)
    """
    target = replicated(mesh)
    elsewhere = lambda x: (
        isinstance(x, jax.Array) and x.committed and not x.sharding.is_equivalent_to(target, x.ndim)
    )
    moved = jax.tree.map(lambda x: jax.device_put(x, target) if elsewhere(x) else x, tree)
    return jax.jit(_copy, out_shardings=target)(moved)


def _copy(tree: Any) -> Any:
    # At module level: jit's caches key on the function, so a fresh lambda per call would trace
    # and compile again on every call.
    return jax.tree.map(jnp.copy, tree)
