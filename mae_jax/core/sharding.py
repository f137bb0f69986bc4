"""Device mesh and sharding rules, in one place.

One 2-D mesh ("data", "fsdp") over every device of every process. Batches are split over both
axes (all devices see different examples); parameters and optimizer state are replicated over
"data" and, when fsdp > 1, split over "fsdp" on one dimension (ZeRO-3 style). The same code
runs on one CPU, one GPU or many hosts: each process feeds its local slice of the batch
(`global_batch_from_host`) and parameters are created already sharded (`create_sharded`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)


def create_mesh(*, data: int = -1, fsdp: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """Mesh with axes ("data", "fsdp"); one size may be -1 to take the remaining devices.

    Axis types are Auto (the jit partitioner propagates shardings), not jax 0.10's default
    Explicit, so model code needs no sharding annotations.
    """
    devices = list(jax.devices() if devices is None else devices)
    data, fsdp = mesh_shape(data, fsdp, len(devices))
    axis_types = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=axis_types, devices=devices)


def mesh_shape(data: int, fsdp: int, count: int) -> tuple[int, int]:
    """(data, fsdp) sizes over `count` devices, -1 resolved; ValueError if they do not fit."""
    if data == -1 and fsdp == -1:
        raise ValueError("At most one of mesh sizes data/fsdp may be -1 (the rest).")
    if data == -1 or fsdp == -1:
        known = fsdp if data == -1 else data
        if known <= 0 or count % known:
            raise ValueError(
                f"Mesh size {known} does not divide the {count} devices; choose a divisor of "
                f"{count} or -1."
            )
        data, fsdp = (count // known, fsdp) if data == -1 else (data, count // known)
    if data <= 0 or fsdp <= 0 or data * fsdp != count:
        raise ValueError(
            f"Mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices but {count} are "
            f"available; make data * fsdp == {count} or set one of them to -1."
        )
    return data, fsdp


def replicated(mesh: Mesh) -> NamedSharding:
    """Same full array on every device."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over all devices: x: [B, ...] -> [B / devices, ...] each."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def fsdp_sharding_for(shape: Sequence[int], mesh: Mesh, *, min_size: int = 2**14) -> NamedSharding:
    """Sharding rule for one parameter or optimizer-state array.

    Replicated over "data"; over "fsdp", split along the largest dimension divisible by the fsdp
    size (ties: the last such dimension). Arrays smaller than `min_size` elements, scalars, and
    arrays without a divisible dimension stay replicated: splitting them saves little memory and
    costs a gather.
    """
    fsdp = mesh.shape[FSDP_AXIS]
    if fsdp == 1 or len(shape) == 0 or int(np.prod(shape)) < min_size:
        return replicated(mesh)
    candidates = [(size, axis) for axis, size in enumerate(shape) if size % fsdp == 0]
    if not candidates:
        return replicated(mesh)
    _, axis = max(candidates)
    spec = [None] * len(shape)
    spec[axis] = FSDP_AXIS
    return NamedSharding(mesh, PartitionSpec(*spec))


def state_shardings(abstract_state: Any, mesh: Mesh, *, min_size: int = 2**14) -> Any:
    """Pytree of NamedShardings matching `abstract_state` (arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map(
        lambda x: fsdp_sharding_for(x.shape, mesh, min_size=min_size), abstract_state
    )


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying `.sharding`, e.g. the target for a checkpoint restore."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings
    )


def create_sharded(
    init_fn: Callable[..., Any], mesh: Mesh, *args: Any, min_size: int = 2**14
) -> tuple[Any, Any]:
    """Runs `init_fn(*args)` under jit so its outputs are born sharded; returns (state, shardings).

    The full, unsharded state never exists on one device. `init_fn` must return a pytree of
    arrays (e.g. `nnx.state(model)` or `(params, opt_state)`); non-array args (rng keys are
    fine) are traced.
    """
    abstract = jax.eval_shape(init_fn, *args)
    shardings = state_shardings(abstract, mesh, min_size=min_size)
    state = jax.jit(init_fn, out_shardings=shardings)(*args)
    return state, shardings


def global_batch_from_host(
    local_batch: Mapping[str, np.ndarray], sharding: NamedSharding
) -> dict[str, jax.Array]:
    """Global jax.Arrays from each process's local numpy batch.

    local_batch[k]: [B_local, ...] on each process -> global [B_local * processes, ...], split
    by `sharding` (normally `batch_sharding(mesh)`). B_local must divide evenly over the
    process's local devices. Entries that already are global jax.Arrays sharded by `sharding`
    (batches made on the devices, `mae_jax.data.on_device`) pass through unchanged; a jax.Array
    sharded otherwise is an error, not a silent copy through the host.
    """
    local_devices = len(sharding.addressable_devices)
    batch = {}
    for name, value in local_batch.items():
        if isinstance(value, jax.Array):
            if not value.sharding.is_equivalent_to(sharding, value.ndim):
                raise ValueError(
                    f"Batch entry {name!r} is a jax.Array sharded as {value.sharding}, not as "
                    f"the batch sharding {sharding}; make it with that sharding (e.g. "
                    "out_shardings=batch_sharding(mesh)) or pass a numpy array."
                )
            batch[name] = value
            continue
        value = np.asarray(value)
        if value.ndim == 0 or value.shape[0] % local_devices:
            raise ValueError(
                f"Batch entry {name!r} has shape {value.shape}: its leading dimension must be a "
                f"multiple of the {local_devices} local devices; change the per-host batch size."
            )
        batch[name] = jax.make_array_from_process_local_data(sharding, value)
    return batch
