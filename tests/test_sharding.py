"""Sharded models on 8 fake CPU devices equal the single-device model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import emjax.models
import emjax.sae
from emjax import distributed, lora
from emjax.kernels import similarity_topk
from emjax.lora import LoRAConfig
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
@pytest.mark.slow
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
    expected = NamedSharding(mesh, P(("data", "fsdp"), None, None, "tensor", None))  # [B, layer groups, S, kv, K]
    assert out.cache.layers[1].k.sharding.is_equivalent_to(expected, 5)
    np.testing.assert_allclose(results[1], results[0], rtol=1e-5, atol=1e-5)


def test_parameters_are_really_sharded(checkpoint):
    mesh = distributed.make_mesh(data=2, fsdp=2, tensor=2)
    model = emjax.models.load(checkpoint, dtype="float32", mesh=mesh)
    attn = model.blocks.layers[0].attn  # stacked: a leading layer axis, never split
    expected = {
        "q": P(None, "fsdp", "tensor", None),
        "k": P(None, "fsdp", "tensor", None),
        "o": P(None, "tensor", None, "fsdp"),
    }
    for name, spec in expected.items():
        array = getattr(attn, name)[...]
        assert array.sharding.spec == spec, name
        shard_shape = array.addressable_shards[0].data.shape
        assert np.prod(shard_shape) * 4 == np.prod(array.shape), (name, shard_shape)
    assert model.embed[...].sharding.spec == P("tensor", "fsdp")
    assert model.blocks.layers[0].mlp.down[...].sharding.spec == P(None, "tensor", "fsdp")


@pytest.mark.slow
def test_sharded_random_init_equals_unsharded(checkpoint, single):
    mesh = distributed.make_mesh(data=2, fsdp=2, tensor=2)
    config = single.config.to_hf()
    a = emjax.models.build(config, seed=3, dtype="float32")
    b = emjax.models.build(config, seed=3, dtype="float32", mesh=mesh)
    assert b.blocks.layers[0].attn.q[...].sharding.spec == P(None, "fsdp", "tensor", None)
    np.testing.assert_array_equal(np.asarray(a.blocks[1].attn.q[...]), np.asarray(b.blocks[1].attn.q[...]))
    ids = jnp.asarray(np.random.RandomState(1).randint(0, 96, (4, 6)))
    np.testing.assert_allclose(
        np.asarray(emjax.models.jit_forward(b)(ids).logits), np.asarray(a(ids).logits), rtol=1e-5, atol=1e-5
    )


def test_indivisible_dimension_fails_loudly(checkpoint):
    mesh = distributed.make_mesh(data=1, fsdp=2, tensor=4)  # 2 kv heads over 4 tensor shards
    with pytest.raises(ValueError, match="kv_heads.*not divisible"):
        emjax.models.load(checkpoint, dtype="float32", mesh=mesh)


# ---------------------------------------------------------------------------- meshes made outside emjax

JAX_AXES = ("data", "fsdp", "tensor", "expert")


def explicit_mesh(shape=(1, 2, 2, 2)):
    """A mesh as JAX's documentation teaches (jax.make_mesh), with Explicit axes whatever jax's default."""
    return jax.make_mesh(shape, JAX_AXES, axis_types=(AxisType.Explicit,) * 4)


def test_a_jax_make_mesh_mesh_loads_and_matches_unsharded_logits(checkpoint, single):
    mesh = explicit_mesh()
    model = emjax.models.load(checkpoint, dtype="float32", mesh=mesh)
    assert model.blocks.layers[0].attn.q[...].sharding.spec == P(None, "fsdp", "tensor", None)
    ids = np.random.RandomState(5).randint(0, 96, (4, 7))
    want = np.asarray(single(jnp.asarray(ids)).logits)
    forward = emjax.models.jit_forward(model, capture=(1,))
    placed = jax.device_put(ids, NamedSharding(mesh, P("fsdp", None)))  # input on the user's Explicit mesh
    np.testing.assert_allclose(np.asarray(forward(placed).logits), want, rtol=1e-5, atol=1e-5)
    with jax.set_mesh(mesh):  # the documented way to make a mesh current
        np.testing.assert_allclose(np.asarray(forward(jnp.asarray(ids)).logits), want, rtol=1e-5, atol=1e-5)
    built = emjax.models.build(single.config.to_hf(), seed=3, dtype="float32", mesh=mesh)
    reference = emjax.models.build(single.config.to_hf(), seed=3, dtype="float32")
    assert built.blocks.layers[0].attn.q[...].sharding.spec == P(None, "fsdp", "tensor", None)
    np.testing.assert_array_equal(np.asarray(built.blocks[1].attn.q[...]), np.asarray(reference.blocks[1].attn.q[...]))


@pytest.mark.slow
def test_lora_sae_and_similarity_take_a_jax_make_mesh_mesh(checkpoint, single, tmp_path):
    mesh = explicit_mesh((2, 2, 2, 1))
    model = lora.attach(emjax.models.load(checkpoint, dtype="float32", mesh=mesh), LoRAConfig(rank=2), mesh=mesh)
    ids = jnp.asarray(np.random.RandomState(6).randint(0, 96, (4, 5)))
    want = np.asarray(single(ids).logits)  # B starts at zero
    np.testing.assert_allclose(np.asarray(emjax.models.jit_forward(model)(ids).logits), want, rtol=1e-5, atol=1e-5)

    sae = emjax.sae.ReLUSAE(16, 32, rngs=nnx.Rngs(0))
    emjax.sae.save(sae, tmp_path / "sae")
    x = np.random.default_rng(7).normal(size=(8, 16)).astype(np.float32)
    sharded = emjax.sae.load(tmp_path / "sae", mesh=mesh)
    assert "tensor" in sharded.W_enc[...].sharding.spec
    np.testing.assert_allclose(
        np.asarray(sharded(x)), np.asarray(emjax.sae.load(tmp_path / "sae")(x)), rtol=1e-5, atol=1e-5
    )

    keys = np.random.default_rng(8).integers(-2, 3, (40, 8)).astype(np.float32)  # exact: bitwise comparison
    queries = keys[:6] + 1
    for got, want in zip(
        similarity_topk(queries, keys, 5, normalize=False, mesh=mesh, method="xla"),
        similarity_topk(queries, keys, 5, normalize=False, method="xla"),
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize(
    "shape, names, message",
    [
        ((2, 4), ("data", "tensor"), r"missing \('fsdp', 'expert'\)"),
        ((2, 1, 2, 2, 1), (*JAX_AXES, "pipeline"), r"unexpected \('pipeline',\)"),
    ],
)
def test_a_mesh_without_the_four_axes_is_refused_naming_them(checkpoint, shape, names, message):
    mesh = jax.make_mesh(shape, names)
    with pytest.raises(ValueError, match=rf"the mesh has axes .* but emjax needs exactly .*{message}"):
        emjax.models.load(checkpoint, dtype="float32", mesh=mesh)
