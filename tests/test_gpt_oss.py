"""gpt-oss: grouped-matmul MoE vs the dense reference, expert parallelism, MXFP4 checkpoints."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import emjax.models
from emjax import distributed
from emjax.models.checkpoint import MXFP4Tensor
from hf_oracle import assert_close, random_gpt_oss, reference


@pytest.fixture(scope="module")
def many_experts(tmp_path_factory):
    """16 experts, top-3: more experts than devices on every mesh below."""
    return random_gpt_oss(tmp_path_factory.mktemp("moe"), num_local_experts=16, num_experts_per_tok=3)


@pytest.mark.slow
def test_grouped_matmuls_equal_the_dense_reference(many_experts):
    _, path = many_experts
    model = emjax.models.load(path, dtype="float32")
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 96, (3, 10)))
    grouped = np.asarray(model(ids, capture=(1,)).captured[1])
    for block in model.blocks.layers:  # each holds a stack of layers
        block.experts.dense = True
    dense = np.asarray(model(ids, capture=(1,)).captured[1])
    np.testing.assert_allclose(grouped, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "sizes", [dict(data=1, expert=8), dict(data=2, expert=4), dict(data=1, fsdp=2, expert=2, tensor=2)]
)
def test_expert_parallel_forward_equals_transformers(many_experts, sizes):
    hf, path = many_experts
    mesh = distributed.make_mesh(**sizes)
    model = emjax.models.load(path, dtype="float32", mesh=mesh)
    assert model.blocks[0].experts.gate_up[...].sharding.spec[0] == "expert"
    ids = np.random.RandomState(1).randint(0, 96, (8, 9))
    out = emjax.models.jit_forward(model)(distributed.shard_batch(ids, mesh))
    assert_close(out.logits, reference(hf, ids)[0])


def random_mxfp4(rng, experts, rows, groups):
    blocks = rng.randint(0, 256, (experts, rows, groups, 16)).astype(np.uint8)
    scales = rng.randint(0, 256, (experts, rows, groups)).astype(np.uint8)
    scales[0, 0, :] = [0, 255, 127, 128][:groups] if groups <= 4 else scales[0, 0, :]  # extreme exponents
    return blocks, scales


def test_mxfp4_dequantisation_equals_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    rng = np.random.RandomState(0)
    blocks, scales = random_mxfp4(rng, 3, 5, 4)
    scales[1, 2] = [0, 1, 254, 255]  # extreme exponents: subnormal results and inf
    ref = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32).numpy()
    tensor = MXFP4Tensor(blocks, scales, "w")
    ours = tensor[slice(None), slice(None), slice(None)]
    assert ours.shape == ref.shape == tensor.shape == (3, 128, 5)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(np.signbit(ours), np.signbit(ref))  # -0.0 keeps its sign
    assert np.isinf(ours).any() and (ours == 0).any()
    # A block that starts and ends inside quantisation groups reads only what it needs.
    np.testing.assert_array_equal(tensor[slice(1, 3), slice(40, 77), slice(2, 5)], ref[1:3, 40:77, 2:5])


@pytest.mark.slow
def test_mxfp4_checkpoint_loads_like_transformers(tmp_path):
    """Experts stored as *_blocks + *_scales, as in the public gpt-oss checkpoints."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    hf, _ = random_gpt_oss(tmp_path / "dense", intermediate_size=32, max_shard_size="10MB")
    rng = np.random.RandomState(2)
    packed = {}
    with torch.no_grad():
        for i, layer in enumerate(hf.model.layers):
            for name, rows, cols in (("gate_up_proj", 64, 32), ("down_proj", 32, 32)):
                blocks, scales = random_mxfp4(rng, 4, rows, cols // 32)
                scales[:] = rng.randint(122, 128, scales.shape)  # moderate magnitudes
                dense = convert_moe_packed_tensors(
                    torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32
                )
                getattr(layer.mlp.experts, name).copy_(dense)
                key = f"model.layers.{i}.mlp.experts.{name}"
                packed[key + "_blocks"], packed[key + "_scales"] = torch.from_numpy(blocks), torch.from_numpy(scales)
    path = tmp_path / "mxfp4"
    hf.save_pretrained(path, max_shard_size="10MB")
    tensors = load_file(path / "model.safetensors")
    for key in list(tensors):
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            del tensors[key]
    save_file(tensors | packed, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (path / "config.json").write_text(json.dumps(config))

    model = emjax.models.load(path, dtype="float32")
    ids = np.random.RandomState(3).randint(0, 96, (2, 8))
    assert_close(model(jnp.asarray(ids)).logits, reference(hf, ids)[0])
