"""Llama-3.x (LlamaForCausalLM) in Flax NNX.

Llama's own details: RMSNorm that casts back to the input dtype before the
weight multiply, SwiGLU MLP, grouped-query attention scaled by head_dim ** -0.5,
`llama3` RoPE frequency scaling read from config.json, untied embeddings
(tied for the small 3.2 models), no soft-caps, no sliding window.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from emjax.models import hf_config, layers
from emjax.models.checkpoint import HFTensor, attention_tensors, gated_mlp_tensors, outer_tensors, stack_layers
from emjax.models.decoder import DecoderLM, layer_period

ARCHITECTURE = "LlamaForCausalLM"
MODEL_TYPE = "llama"


@dataclasses.dataclass(frozen=True)
class LlamaConfig(hf_config.DecoderShape):
    rope: layers.Rope
    rms_norm_eps: float = 1e-5
    attention_bias: bool = False
    tie_word_embeddings: bool = False

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], source: str = "config.json") -> LlamaConfig:
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: Llama uses SiLU, got hidden_act={hf['hidden_act']!r}")
        if hf.get("mlp_bias"):
            raise ValueError(f"{source}: mlp_bias=true is not a Llama-3 checkpoint layout")
        fields = hf_config.decoder_fields(cls, hf, source)
        return cls(
            **fields,
            rope=layers.Rope.from_hf(hf, fields["head_dim"], source),
            attention_bias=bool(hf.get("attention_bias", False)),
        )

    def to_hf(self) -> dict[str, Any]:
        return hf_config.decoder_hf(self, ARCHITECTURE, MODEL_TYPE) | {
            "rope_theta": self.rope.theta,
            "rope_scaling": None if self.rope.kind == "default" else self.rope.to_hf(),
            "attention_bias": self.attention_bias,
            "hidden_act": "silu",
        }

    def window(self, layer: int) -> None:
        return None


def norm(cfg: LlamaConfig, dtype) -> layers.RMSNorm:
    """Llama RMSNorm: w * (x / rms(x)) with the cast back to x's dtype before the multiply."""
    return layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, offset=0.0, cast_first=True)


class Block(nnx.Module):
    def __init__(self, cfg: LlamaConfig, dtype, sharder: layers.Sharder, rngs: nnx.Rngs):
        self.attn_norm = norm(cfg, dtype)
        self.attn = layers.Attention(
            hidden=cfg.hidden_size, heads=cfg.num_heads, kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
            scale=cfg.head_dim**-0.5, rope=cfg.rope, window=None, bias=cfg.attention_bias,
            dtype=dtype, sharder=sharder, rngs=rngs,
        )  # fmt: skip
        self.mlp_norm = norm(cfg, dtype)
        self.mlp = layers.GatedMLP(cfg.hidden_size, cfg.intermediate_size, jax.nn.silu, dtype, sharder, rngs)  # SwiGLU

    def __call__(self, x, **attention_inputs):
        h, cache = self.attn(self.attn_norm(x), **attention_inputs)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), cache


class Llama(DecoderLM):
    """LlamaForCausalLM. Call as model(tokens, attention_mask=, capture=, stop_at_layer=, cache=)."""

    def __init__(self, cfg: LlamaConfig, *, dtype=jnp.bfloat16, rngs: nnx.Rngs, sharder: layers.Sharder | None = None):
        sharder = sharder or layers.no_sharding()
        super().__init__(
            cfg, dtype=dtype, rngs=rngs, sharder=sharder,
            block=lambda i: Block(cfg, dtype, sharder, rngs), norm=lambda: norm(cfg, dtype),
        )  # fmt: skip


def hf_tensors(cfg: LlamaConfig) -> dict:
    """Our parameter path -> the Hugging Face tensor(s) it is read from, and how (layers stacked as
    LayerStack holds them)."""
    table = outer_tensors(cfg)
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}.", f"blocks.{i}."
        table |= attention_tensors(hf, ours, cfg, bias=cfg.attention_bias) | gated_mlp_tensors(hf, ours)
        table |= {
            ours + "attn_norm.weight": HFTensor(hf + "input_layernorm.weight"),
            ours + "mlp_norm.weight": HFTensor(hf + "post_attention_layernorm.weight"),
        }
    return stack_layers(table, cfg.num_layers, layer_period(cfg))
