"""Mesh construction and sharding rules on 4 simulated CPU devices (see conftest.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from mae_jax.core import sharding


def test_four_simulated_devices_are_available():
    assert jax.device_count() == 4


@pytest.mark.parametrize(
    "data, fsdp, expected",
    [(-1, 1, (4, 1)), (1, -1, (1, 4)), (2, 2, (2, 2)), (-1, 2, (2, 2)), (4, 1, (4, 1))],
)
def test_create_mesh_sizes(data, fsdp, expected):
    mesh = sharding.create_mesh(data=data, fsdp=fsdp)
    assert (mesh.shape["data"], mesh.shape["fsdp"]) == expected
    assert mesh.axis_names == ("data", "fsdp")
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("count", [1, 2])
def test_create_mesh_on_a_subset_of_devices(count):
    mesh = sharding.create_mesh(devices=jax.devices()[:count])
    assert mesh.shape["data"] == count and mesh.devices.size == count


@pytest.mark.parametrize(
    "data, fsdp, message",
    [(3, 1, "needs 3 devices"), (-1, 3, "does not divide"), (-1, -1, "At most one"),
     (2, 4, "needs 8 devices")],
)
def test_create_mesh_rejects_bad_sizes(data, fsdp, message):
    with pytest.raises(ValueError, match=message):
        sharding.create_mesh(data=data, fsdp=fsdp)


def test_fsdp_rule_picks_largest_divisible_dimension_and_replicates_small_arrays():
    mesh = sharding.create_mesh(data=1, fsdp=4)
    assert sharding.fsdp_sharding_for((192, 768), mesh).spec == PartitionSpec(None, "fsdp")
    assert sharding.fsdp_sharding_for((768, 192), mesh).spec == PartitionSpec("fsdp", None)
    # 1026 is not divisible by 4, so the smaller divisible dimension is used.
    assert sharding.fsdp_sharding_for((1026, 64), mesh).spec == PartitionSpec(None, "fsdp")
    assert sharding.fsdp_sharding_for((768,), mesh).spec == PartitionSpec()  # Small.
    assert sharding.fsdp_sharding_for((), mesh).spec == PartitionSpec()
    assert sharding.fsdp_sharding_for((129, 129), mesh).spec == PartitionSpec()  # No divisor.
    # Without an fsdp axis everything is replicated over "data".
    data_mesh = sharding.create_mesh(data=4, fsdp=1)
    assert sharding.fsdp_sharding_for((192, 768), data_mesh).spec == PartitionSpec()


def test_batch_sharding_splits_over_all_devices():
    mesh = sharding.create_mesh(data=2, fsdp=2)
    local = {"image": np.arange(8 * 3, dtype=np.float32).reshape(8, 3), "label": np.arange(8)}
    batch = sharding.global_batch_from_host(local, sharding.batch_sharding(mesh))
    assert batch["image"].shape == (8, 3)
    assert {shard.data.shape for shard in batch["image"].addressable_shards} == {(2, 3)}
    np.testing.assert_array_equal(np.asarray(batch["label"]), np.arange(8))
    with pytest.raises(ValueError, match="multiple of the 4 local devices"):
        sharding.global_batch_from_host({"image": np.zeros((6, 3))},
                                        sharding.batch_sharding(mesh))


class Wide(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.big = nnx.Linear(64, 256, rngs=rngs)
        self.small = nnx.Linear(4, 4, rngs=rngs)


def test_create_sharded_gives_params_born_sharded():
    mesh = sharding.create_mesh(data=2, fsdp=2)

    def init(key):
        return nnx.state(Wide(rngs=nnx.Rngs(params=key)), nnx.Param)

    state, shardings = sharding.create_sharded(init, mesh, jax.random.key(0))
    kernel = state["big"]["kernel"].value
    assert kernel.sharding.spec == PartitionSpec(None, "fsdp")
    assert {s.data.shape for s in kernel.addressable_shards} == {(64, 128)}
    assert state["small"]["kernel"].value.sharding.spec == PartitionSpec()
    # Same values as an unsharded init.
    np.testing.assert_allclose(kernel, init(jax.random.key(0))["big"]["kernel"].value)
    abstract = sharding.abstract_with_shardings(jax.eval_shape(init, jax.random.key(0)), shardings)
    assert abstract["big"]["kernel"].value.sharding.spec == PartitionSpec(None, "fsdp")

    @jax.jit
    def apply(state, x):
        return x @ state["big"]["kernel"].value

    out = apply(state, jnp.ones((4, 64)))
    np.testing.assert_allclose(out, jnp.ones((4, 64)) @ np.asarray(kernel), rtol=1e-5)
