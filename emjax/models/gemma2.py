"""Gemma-2 (Gemma2ForCausalLM) in Flax NNX.

Every Gemma-2 detail lives here: the embedding scaled by sqrt(d_model) in the
activation dtype, RMSNorm with (1 + w), four norms per block (pre and post
around attention and MLP), GeGLU with tanh GELU, grouped-query attention with
queries scaled by query_pre_attn_scalar ** -0.5 (from config.json), attention
logits soft-capped before the mask, sliding-window and global layers from
`layer_types` (layer 0 sliding), final logits soft-capped, tied embeddings.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from emjax.models import hf_config, layers
from emjax.models.checkpoint import HFTensor, attention_tensors, gated_mlp_tensors, outer_tensors, stack_layers
from emjax.models.decoder import DecoderLM, layer_period

ARCHITECTURE = "Gemma2ForCausalLM"
MODEL_TYPE = "gemma2"


@dataclasses.dataclass(frozen=True)
class Gemma2Config(hf_config.DecoderShape):
    query_pre_attn_scalar: float
    sliding_window: int
    layer_types: tuple[str, ...]
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attn_logit_softcap: float | None = 50.0
    final_logit_softcap: float | None = 30.0
    tie_word_embeddings: bool = True

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], source: str = "config.json") -> Gemma2Config:
        get = lambda key, *default: hf_config.field(hf, key, *default, source=source)  # noqa: E731
        activation = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        if activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"{source}: Gemma-2 uses tanh-approximate GELU, got hidden_activation={activation!r}")
        if hf.get("attention_bias"):
            raise ValueError(f"{source}: attention_bias=true is not a Gemma-2 checkpoint layout")
        if hf_config.rope_scaling(hf) is not None:
            raise ValueError(f"{source}: Gemma-2 uses plain RoPE, got scaling {hf_config.rope_scaling(hf)}")
        fields = hf_config.decoder_fields(cls, hf, source)
        return cls(
            **fields,
            **hf_config.sliding_fields(hf, fields["num_layers"], source),
            query_pre_attn_scalar=float(get("query_pre_attn_scalar")),
            rope_theta=hf_config.rope_theta(hf),
            attn_logit_softcap=hf.get("attn_logit_softcapping"),
            final_logit_softcap=hf.get("final_logit_softcapping"),
        )

    def to_hf(self) -> dict[str, Any]:
        """The config.json fields transformers' Gemma2ForCausalLM reads."""
        return hf_config.decoder_hf(self, ARCHITECTURE, MODEL_TYPE) | hf_config.sliding_hf(self) | {
            # transformers validates this field as an int
            "query_pre_attn_scalar": int(q) if (q := self.query_pre_attn_scalar).is_integer() else q,
            "rope_theta": self.rope_theta,
            "attn_logit_softcapping": self.attn_logit_softcap,
            "final_logit_softcapping": self.final_logit_softcap,
            "hidden_activation": "gelu_pytorch_tanh",
        }

    def window(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_types[layer] == hf_config.SLIDING else None


def gelu_tanh(x):
    """GeGLU's activation: GELU with the tanh approximation."""
    return jax.nn.gelu(x, approximate=True)


def norm(cfg: Gemma2Config, dtype) -> layers.RMSNorm:
    """Gemma RMSNorm: x / rms(x) * (1 + w), in fp32, cast back."""
    return layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, offset=1.0)


class Block(nnx.Module):
    """Pre- and post-norms around both attention and the MLP."""

    def __init__(self, cfg: Gemma2Config, layer: int, dtype, sharder: layers.Sharder, rngs: nnx.Rngs):
        self.pre_attn_norm = norm(cfg, dtype)
        self.attn = layers.Attention(
            hidden=cfg.hidden_size, heads=cfg.num_heads, kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
            scale=cfg.query_pre_attn_scalar**-0.5, rope=layers.Rope(cfg.head_dim, cfg.rope_theta),
            window=cfg.window(layer), logit_cap=cfg.attn_logit_softcap, dtype=dtype, sharder=sharder, rngs=rngs,
        )  # fmt: skip
        self.post_attn_norm = norm(cfg, dtype)
        self.pre_mlp_norm = norm(cfg, dtype)
        self.mlp = layers.GatedMLP(cfg.hidden_size, cfg.intermediate_size, gelu_tanh, dtype, sharder, rngs)
        self.post_mlp_norm = norm(cfg, dtype)

    def __call__(self, x, **attention_inputs):
        h, cache = self.attn(self.pre_attn_norm(x), **attention_inputs)
        x = x + self.post_attn_norm(h)
        x = x + self.post_mlp_norm(self.mlp(self.pre_mlp_norm(x)))
        return x, cache


class Gemma2(DecoderLM):
    """Gemma2ForCausalLM. Call as model(tokens, attention_mask=, capture=, stop_at_layer=, cache=)."""

    def __init__(self, cfg: Gemma2Config, *, dtype=jnp.bfloat16, rngs: nnx.Rngs, sharder: layers.Sharder | None = None):
        sharder = sharder or layers.no_sharding()
        super().__init__(
            cfg, dtype=dtype, rngs=rngs, sharder=sharder,
            block=lambda i: Block(cfg, i, dtype, sharder, rngs), norm=lambda: norm(cfg, dtype),
        )  # fmt: skip

    def scale_embeddings(self, x):
        # sqrt(d_model) rounded to the activation dtype, as the reference does (sqrt(3584) is 59.75 in bf16).
        return x * jnp.asarray(math.sqrt(self.config.hidden_size), self.dtype)

    def cap_logits(self, logits):
        return layers.softcap(logits, self.config.final_logit_softcap)


def hf_tensors(cfg: Gemma2Config) -> dict:
    """Our parameter path -> the Hugging Face tensor(s) it is read from, and how (layers stacked as
    LayerStack holds them)."""
    table = outer_tensors(cfg)
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}.", f"blocks.{i}."
        table |= attention_tensors(hf, ours, cfg, bias=False) | gated_mlp_tensors(hf, ours)
        table |= {
            ours + "pre_attn_norm.weight": HFTensor(hf + "input_layernorm.weight"),
            ours + "post_attn_norm.weight": HFTensor(hf + "post_attention_layernorm.weight"),
            ours + "pre_mlp_norm.weight": HFTensor(hf + "pre_feedforward_layernorm.weight"),
            ours + "post_mlp_norm.weight": HFTensor(hf + "post_feedforward_layernorm.weight"),
        }
    return stack_layers(table, cfg.num_layers, layer_period(cfg))
