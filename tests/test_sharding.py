"""Sharded models on 8 fake CPU devices equal the single-device model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import emjax.models
from emjax import distributed
from hf_oracle import random_gemma2

MESHES = {
    "data2-fsdp2-tensor2": dict(data=2, fsdp=2, tensor=2),
    "fsdp8": dict(data=1, fsdp=8),
    "data4-tensor2": dict(data=4, fsdp=1, tensor=2),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    _, path = random_gemma2(tmp_path_factory.mktemp("shard"), vocab_size=96)
    return path


@pytest.fixture(scope="module")
def single(checkpoint):
    return emjax.models.load(checkpoint, dtype="float32")


def test_eight_fake_devices():
    assert jax.device_count() == 8


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_sharded_forward_equals_single_device(checkpoint, single, mesh_name):
    mesh = distributed.make_mesh(**MESHES[mesh_name])
    model = emjax.models.load(checkpoint, dtype="float32", mesh=mesh)
    ids = np.random.RandomState(0).randint(0, 96, (8, 10))
    mask = np.ones_like(ids)
    mask[3, :4] = 0
    batch = distributed.shard_batch({"ids": ids, "mask": mask}, mesh)
    forward = emjax.models.jit_forward(model, capture=(0, 2))
    out = forward(batch["ids"], batch["mask"])
    ref = single(jnp.asarray(ids), attention_mask=jnp.asarray(mask), capture=(0, 2))
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref.logits), rtol=1e-5, atol=1e-5)
    for layer in (0, 2):
        np.testing.assert_allclose(
            np.asarray(out.captured[layer]), np.asarray(ref.captured[layer]), rtol=1e-5, atol=1e-5
        )


def test_sharded_kv_cache_decoding_equals_single_device(checkpoint, single):
    mesh = distributed.make_mesh(data=2, fsdp=2, tensor=2)
    model = emjax.models.load(checkpoint, dtype="float32", mesh=mesh)
    ids = np.random.RandomState(2).randint(0, 96, (4, 9))
    results = []
    for m in (single, model):
        forward = emjax.models.jit_forward(m)
        out = forward(jnp.asarray(ids[:, :5]), None, m.init_cache(batch=4, max_len=9))
        logits = [np.asarray(out.logits)]
        for t in range(5, 9):
            out = forward(jnp.asarray(ids[:, t : t + 1]), None, out.cache)
            logits.append(np.asarray(out.logits))
        results.append(np.concatenate(logits, axis=1))
    expected = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    assert out.cache.layers[1].k.sharding.is_equivalent_to(expected, 4)
    np.testing.assert_allclose(results[1], results[0], rtol=1e-5, atol=1e-5)


def test_parameters_are_really_sharded(checkpoint):
    mesh = distributed.make_mesh(data=2, fsdp=2, tensor=2)
    model = emjax.models.load(checkpoint, dtype="float32", mesh=mesh)
    attn = model.blocks[0].attn
    expected = {
        "q": P("fsdp", "tensor", None),
        "k": P("fsdp", "tensor", None),
        "o": P("tensor", None, "fsdp"),
    }
    for name, spec in expected.items():
        array = getattr(attn, name)[...]
        assert array.sharding.spec == spec, name
        shard_shape = array.addressable_shards[0].data.shape
        assert np.prod(shard_shape) * 4 == np.prod(array.shape), (name, shard_shape)
    assert model.embed[...].sharding.spec == P("tensor", "fsdp")
    assert model.blocks[0].mlp.down[...].sharding.spec == P("tensor", "fsdp")


def test_sharded_random_init_equals_unsharded(checkpoint, single):
    mesh = distributed.make_mesh(data=2, fsdp=2, tensor=2)
    config = single.config.to_hf()
    a = emjax.models.build(config, seed=3, dtype="float32")
    b = emjax.models.build(config, seed=3, dtype="float32", mesh=mesh)
    assert b.blocks[1].attn.q[...].sharding.spec == P("fsdp", "tensor", None)
    np.testing.assert_array_equal(np.asarray(a.blocks[1].attn.q[...]), np.asarray(b.blocks[1].attn.q[...]))
    ids = jnp.asarray(np.random.RandomState(1).randint(0, 96, (4, 6)))
    np.testing.assert_allclose(
        np.asarray(emjax.models.jit_forward(b)(ids).logits), np.asarray(a(ids).logits), rtol=1e-5, atol=1e-5
    )


def test_indivisible_dimension_fails_loudly(checkpoint):
    mesh = distributed.make_mesh(data=1, fsdp=2, tensor=4)  # 2 kv heads over 4 tensor shards
    with pytest.raises(ValueError, match="kv_heads.*not divisible"):
        emjax.models.load(checkpoint, dtype="float32", mesh=mesh)
