"""The published config.json files give the published parameter counts and shard cleanly.

Only abstract shapes are built (nnx.eval_shape): nothing is allocated.
The config fields below are those of the public config.json files of
google/gemma-2-{2b,9b,27b}, meta-llama/Llama-3.1-8B and openai/gpt-oss-20b;
the counts are the ones their model cards report.
"""

import functools
import math

import pytest
from flax import nnx

import emjax.models
from emjax import distributed
from emjax.models import gemma2

GEMMA2 = {
    "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "vocab_size": 256000,
    "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096, "cache_implementation": "hybrid",
    "max_position_embeddings": 8192, "attention_bias": False,
}  # fmt: skip
PUBLISHED = {
    "gemma-2-2b": (GEMMA2 | dict(
        hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
    ), 2_614_341_888),
    "gemma-2-9b": (GEMMA2 | dict(
        hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256,
    ), 9_241_705_984),
    "gemma-2-27b": (GEMMA2 | dict(
        hidden_size=4608, intermediate_size=36864, num_hidden_layers=46, num_attention_heads=32,
        num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=144,
    ), 27_227_128_320),
    "llama-3.1-8b": ({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "max_position_embeddings": 131072, "attention_bias": False, "mlp_bias": False,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    }, 8_030_261_248),
    "gpt-oss-20b": ({
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "vocab_size": 201088, "hidden_size": 2880,
        "intermediate_size": 2880, "num_hidden_layers": 24, "num_attention_heads": 64, "num_key_value_heads": 8,
        "head_dim": 64, "num_local_experts": 32, "experts_per_token": 4, "num_experts_per_tok": 4,
        "sliding_window": 128, "rms_norm_eps": 1e-05, "rope_theta": 150000, "swiglu_limit": 7.0,
        "tie_word_embeddings": False, "attention_bias": True, "max_position_embeddings": 131072,
        "layer_types": ["sliding_attention", "full_attention"] * 12,
        "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                         "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
        "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]},
    }, 20_914_757_184),
}  # fmt: skip


@functools.cache
def abstract_state(name):
    hf, _ = PUBLISHED[name]
    family = emjax.models.family_of(hf)
    cfg = family.config.from_hf(hf)
    model = nnx.eval_shape(lambda: family.model(cfg, rngs=nnx.Rngs(0)))
    return cfg, nnx.state(model, nnx.Param)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_parameter_count_matches_the_model_card(name):
    _, count = PUBLISHED[name]
    _, state = abstract_state(name)
    assert sum(math.prod(v.shape) for _, v in nnx.to_flat_state(state)) == count


def test_architecture_numbers_come_from_config_json():
    cfg, _ = abstract_state("gemma-2-27b")
    assert cfg.layer_types[:2] == (gemma2.SLIDING, gemma2.FULL) and cfg.query_pre_attn_scalar == 144
    llama, _ = abstract_state("llama-3.1-8b")
    assert (llama.rope.kind, llama.rope.factor, llama.rope.theta) == ("llama3", 8.0, 500000.0)
    gpt, _ = abstract_state("gpt-oss-20b")
    assert (gpt.rope.kind, gpt.rope.truncate, gpt.window(0), gpt.window(1)) == ("yarn", False, 128, None)


@pytest.mark.parametrize("name", list(PUBLISHED))
@pytest.mark.parametrize(
    "mesh_sizes",
    [dict(data=2, fsdp=2, tensor=2), dict(fsdp=8), dict(data=1, fsdp=2, tensor=4), dict(data=1, fsdp=2, expert=4)],
)
def test_published_shapes_shard_over_eight_devices(name, mesh_sizes):
    _, count = PUBLISHED[name]
    mesh = distributed.make_mesh(**mesh_sizes)
    _, state = abstract_state(name)
    shardings = emjax.models.param_shardings(state, mesh)
    per_device = 0
    for path, var in nnx.to_flat_state(state):
        shard = shardings[".".join(map(str, path))].shard_shape(var.shape)
        per_device += math.prod(shard)
    # Everything large is split over fsdp x tensor (only norms, biases and the router are not).
    assert per_device < count / (mesh.shape["fsdp"] * mesh.shape["tensor"]) * 1.01
    if name == "gpt-oss-20b":  # and experts over the expert axis too
        gate_up = shardings["blocks.0.experts.gate_up"].shard_shape((32, 2880, 2880, 2))
        assert gate_up == (32 // mesh.shape["expert"], 2880 // mesh.shape["fsdp"], 2880 // mesh.shape["tensor"], 2)
