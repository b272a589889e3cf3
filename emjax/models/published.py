"""The published architectures of the real configs, kept in the project.

The fields are those of the public config.json files of
google/gemma-2-{2b,9b,27b}, meta-llama/Llama-3.1-8B and openai/gpt-oss-20b;
the parameter counts are the ones their model cards report. They let a real
config be built abstractly (shapes and shardings, nothing allocated) without
its checkpoint: the dry run compiles a pod-sized config on a CPU host from
these, and the tests check them against the model cards.

A config names one with `model.published`; a checkpoint's own config.json,
when present, always wins.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from emjax.config import ConfigError


class Published(NamedTuple):
    config: dict[str, Any]  # the config.json fields
    parameters: int  # the model card's parameter count


_GEMMA2 = {
    "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "vocab_size": 256000,
    "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096, "cache_implementation": "hybrid",
    "max_position_embeddings": 8192, "attention_bias": False,
}  # fmt: skip
PUBLISHED: dict[str, Published] = {
    "gemma-2-2b": Published(_GEMMA2 | dict(
        hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
    ), 2_614_341_888),
    "gemma-2-9b": Published(_GEMMA2 | dict(
        hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256,
    ), 9_241_705_984),
    "gemma-2-27b": Published(_GEMMA2 | dict(
        hidden_size=4608, intermediate_size=36864, num_hidden_layers=46, num_attention_heads=32,
        num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=144,
    ), 27_227_128_320),
    "llama-3.1-8b": Published({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "max_position_embeddings": 131072, "attention_bias": False, "mlp_bias": False,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    }, 8_030_261_248),
    "gpt-oss-20b": Published({
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


def config_json(name: str) -> dict[str, Any]:
    """A copy of the config.json fields of the published model `name` (e.g. "gemma-2-27b")."""
    if name not in PUBLISHED:
        raise ConfigError(f"model.published={name!r} is not a known architecture; known: {', '.join(PUBLISHED)}")
    return dict(PUBLISHED[name].config)
