"""Mesh construction and logical-axis rules."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from emjax import distributed
from emjax.config import MeshConfig


def test_one_minus_one_fills_the_remaining_devices():
    assert distributed.mesh_shape({"data": -1, "tensor": 2}, 8) == (4, 1, 2, 1)
    assert distributed.mesh_shape({"fsdp": -1}, 8) == (1, 8, 1, 1)
    mesh = distributed.make_mesh(data=2, fsdp=-1, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}


def test_a_config_mesh_section_gives_the_mesh_and_rules_every_caller_uses():
    section = MeshConfig(data=-1, fsdp=2, tensor=2, rules={"mlp": ["fsdp"], "batch": []})
    assert dict(distributed.mesh_of(section).shape) == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}
    four = distributed.mesh_of(section, jax.devices()[:4])
    assert dict(four.shape) == {"data": 1, "fsdp": 2, "tensor": 2, "expert": 1}
    rules = distributed.rules_of(section)
    assert rules["mlp"] == ("fsdp",) and rules["batch"] == () and rules["heads"] == ("tensor",)
    assert distributed.rules_of(MeshConfig()) == distributed.DEFAULT_RULES


def test_a_global_batch_is_rounded_up_to_split_over_the_batch_axes():
    mesh = distributed.make_mesh(data=2, fsdp=2, tensor=2)  # the batch splits over data x fsdp: 4 ways
    assert distributed.data_parallel_size(mesh) == 4
    assert [distributed.global_batch(b, mesh) for b in (1, 4, 5, 8, 9)] == [4, 4, 8, 8, 12]
    no_split = {**distributed.DEFAULT_RULES, "batch": ()}
    assert distributed.data_parallel_size(mesh, no_split) == 1 and distributed.global_batch(5, mesh, no_split) == 5


@pytest.mark.parametrize(
    "sizes, message",
    [
        ({"data": -1, "fsdp": -1}, "at most one"),
        ({"data": 3, "fsdp": -1}, "not divisible"),
        ({"data": 2, "fsdp": 2}, "4 devices, but 8"),
        ({"pipeline": 2}, "unknown mesh axes"),
        ({"data": 0}, "positive"),
    ],
)
def test_bad_mesh_sizes(sizes, message):
    with pytest.raises(ValueError, match=message):
        distributed.mesh_shape(sizes, 8)


def test_rules_map_logical_axes_and_skip_size_one_axes():
    mesh = distributed.make_mesh(data=2, fsdp=2, tensor=2)
    assert distributed.logical_to_spec(("embed", "heads", "head_dim"), (32, 4, 8), mesh) == P("fsdp", "tensor", None)
    assert distributed.logical_to_spec(("batch", None), (8, 3), mesh) == P(("data", "fsdp"), None)
    replicated = distributed.make_mesh(data=8)
    assert distributed.logical_to_spec(("embed", "mlp"), (5, 7), replicated) == P(None, None)


def test_rules_fail_loudly():
    mesh = distributed.make_mesh(data=2, fsdp=2, tensor=2)
    with pytest.raises(ValueError, match="'mlp' of size 7 is not divisible"):
        distributed.logical_to_spec(("embed", "mlp"), (32, 7), mesh, what="w")
    with pytest.raises(ValueError, match="would shard both"):
        distributed.logical_to_spec(("heads", "mlp"), (4, 4), mesh)
    with pytest.raises(KeyError, match="no sharding rule"):
        distributed.logical_to_spec(("nonsense",), (4,), mesh)


def test_shard_batch_splits_rows_over_data_axes():
    mesh = distributed.make_mesh(data=2, fsdp=2, tensor=2)
    x = np.arange(8 * 3).reshape(8, 3)
    placed = distributed.shard_batch({"x": x}, mesh)["x"]
    assert placed.sharding.spec == P(("data", "fsdp"), None)
    assert {s.data.shape for s in placed.addressable_shards} == {(2, 3)}
    np.testing.assert_array_equal(np.asarray(placed), x)
    with pytest.raises(ValueError, match="does not divide over 4"):
        distributed.shard_batch(np.zeros((6, 2)), mesh)


def test_single_process_reads_everything():
    assert jax.process_count() == 1
    assert distributed.process_slice(10) == slice(0, 10)


def test_initialize_is_a_no_op_outside_a_cluster(monkeypatch):
    for var in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_NTASKS", "JAX_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    distributed.initialize()
    assert not jax.distributed.is_initialized()
