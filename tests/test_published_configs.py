"""The published Gemma-2 config.json files give the published parameter counts and shard cleanly.

Only abstract shapes are built (nnx.eval_shape): nothing is allocated.
The config fields below are those of the public google/gemma-2-{2b,9b,27b}
config.json files; the counts are the ones their model cards report.
"""

import functools
import math

import pytest
from flax import nnx

import emjax.models
from emjax import distributed
from emjax.models import gemma2

COMMON = {
    "architectures": ["Gemma2ForCausalLM"],
    "model_type": "gemma2",
    "vocab_size": 256000,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "cache_implementation": "hybrid",
    "max_position_embeddings": 8192,
    "attention_bias": False,
}
PUBLISHED = {
    "gemma-2-2b": (
        dict(
            hidden_size=2304,
            intermediate_size=9216,
            num_hidden_layers=26,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=256,
            query_pre_attn_scalar=256,
        ),
        2_614_341_888,
    ),
    "gemma-2-9b": (
        dict(
            hidden_size=3584,
            intermediate_size=14336,
            num_hidden_layers=42,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=256,
            query_pre_attn_scalar=256,
        ),
        9_241_705_984,
    ),
    "gemma-2-27b": (
        dict(
            hidden_size=4608,
            intermediate_size=36864,
            num_hidden_layers=46,
            num_attention_heads=32,
            num_key_value_heads=16,
            head_dim=128,
            query_pre_attn_scalar=144,
        ),
        27_227_128_320,
    ),
}


@functools.cache
def abstract_state(name):
    fields, _ = PUBLISHED[name]
    cfg = gemma2.Gemma2Config.from_hf(COMMON | fields)
    model = nnx.eval_shape(lambda: gemma2.Gemma2(cfg, rngs=nnx.Rngs(0)))
    return cfg, nnx.state(model, nnx.Param)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_parameter_count_matches_the_model_card(name):
    fields, count = PUBLISHED[name]
    cfg, state = abstract_state(name)
    assert sum(math.prod(v.shape) for _, v in nnx.to_flat_state(state)) == count
    assert cfg.layer_types[0] == gemma2.SLIDING and cfg.layer_types[1] == gemma2.FULL
    assert cfg.query_pre_attn_scalar == fields["query_pre_attn_scalar"]


@pytest.mark.parametrize("name", list(PUBLISHED))
@pytest.mark.parametrize("mesh_sizes", [dict(data=2, fsdp=2, tensor=2), dict(fsdp=8), dict(data=1, fsdp=2, tensor=4)])
def test_published_shapes_shard_over_eight_devices(name, mesh_sizes):
    _, count = PUBLISHED[name]
    mesh = distributed.make_mesh(**mesh_sizes)
    _, state = abstract_state(name)
    shardings = emjax.models.param_shardings(state, mesh)
    per_device = 0
    for path, var in nnx.to_flat_state(state):
        shard = shardings[".".join(map(str, path))].shard_shape(var.shape)
        per_device += math.prod(shard)
    # Parameters are replicated over `data` only (and the small norm vectors everywhere).
    assert per_device < count / (mesh.size // mesh.shape["data"]) * 1.01
