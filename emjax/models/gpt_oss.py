"""gpt-oss (GptOssForCausalLM) in Flax NNX.

gpt-oss's own details: one learned sink logit per head in the softmax
denominator; sliding-window (128) and full layers from `layer_types`, layer 0
sliding; YaRN RoPE (truncate=false in the public config) with its attention
factor on cos and sin; biases on q/k/v/o; a mixture of experts whose router
takes the top-k logits and softmaxes over them; experts with a clamped gated
activation (gate <= limit, |up| <= limit, glu = gate * sigmoid(alpha * gate),
out = (up + 1) * glu) and biases. The checkpoint interleaves gate (even) and
up (odd) columns of gate_up_proj; we keep them as a trailing axis of 2.
Public checkpoints store experts in MXFP4 (see checkpoint.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from emjax.models import hf_config, layers, moe
from emjax.models.checkpoint import HFTensor, attention_tensors, outer_tensors, stack_layers
from emjax.models.decoder import DecoderLM, layer_period

ARCHITECTURE = "GptOssForCausalLM"
MODEL_TYPE = "gpt_oss"


@dataclasses.dataclass(frozen=True)
class GptOssConfig(hf_config.DecoderShape):
    num_experts: int
    experts_per_token: int
    sliding_window: int
    layer_types: tuple[str, ...]
    rope: layers.Rope
    rms_norm_eps: float = 1e-5
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    tie_word_embeddings: bool = False

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], source: str = "config.json") -> GptOssConfig:
        def get(key, *default):
            return hf_config.field(hf, key, *default, source=source)

        fields = hf_config.decoder_fields(cls, hf, source, derive_heads=False)
        if not hf.get("attention_bias", True):
            raise ValueError(f"{source}: gpt-oss checkpoints have attention biases (attention_bias=false given)")
        return cls(
            **fields,
            **hf_config.sliding_fields(hf, fields["num_layers"], source),
            num_experts=int(hf.get("num_local_experts") or get("num_experts")),
            experts_per_token=int(get("num_experts_per_tok")),
            rope=layers.Rope.from_hf(hf, fields["head_dim"], source),
            swiglu_limit=float(get("swiglu_limit", 7.0)),
            swiglu_alpha=float(get("swiglu_alpha", 1.702)),
        )

    def to_hf(self) -> dict[str, Any]:
        return hf_config.decoder_hf(self, ARCHITECTURE, MODEL_TYPE) | hf_config.sliding_hf(self) | {
            "num_local_experts": self.num_experts,
            "num_experts_per_tok": self.experts_per_token,
            "rope_parameters": self.rope.to_hf(),
            "swiglu_limit": self.swiglu_limit,
            "swiglu_alpha": self.swiglu_alpha,
            "attention_bias": True,
        }

    def window(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_types[layer] == hf_config.SLIDING else None


def norm(cfg: GptOssConfig, dtype) -> layers.RMSNorm:
    """RMSNorm: w * (x / rms(x)), multiplied in fp32, then cast."""
    return layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, offset=0.0)


class Experts(nnx.Module):
    """Router + experts. Setting `dense = True` runs the all-experts reference instead of grouped matmuls."""

    def __init__(self, cfg: GptOssConfig, dtype, sharder: layers.Sharder, rngs: nnx.Rngs):
        d, f, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
        self.router = layers.param(rngs, (d, e), ("embed", None), dtype)
        self.router_bias = layers.param(rngs, (e,), (None,), dtype, init=layers.zeros)
        self.gate_up = layers.param(rngs, (e, d, f, 2), ("experts", "embed", "mlp", None), dtype, fan_in=d)
        self.gate_up_bias = layers.param(rngs, (e, f, 2), ("experts", "mlp", None), dtype, init=layers.zeros)
        self.down = layers.param(rngs, (e, f, d), ("experts", "mlp", "embed"), dtype, fan_in=f)
        self.down_bias = layers.param(rngs, (e, d), ("experts", "embed"), dtype, init=layers.zeros)
        self.top_k, self.limit, self.alpha = cfg.experts_per_token, cfg.swiglu_limit, cfg.swiglu_alpha
        self.dense = False
        self.shard = sharder

    def activation(self, h):
        """h [..., F, 2] (gate, up) -> (clip(up) + 1) * g * sigmoid(alpha * g), g = min(gate, limit)."""
        gate = jnp.minimum(h[..., 0], self.limit)
        up = jnp.clip(h[..., 1], -self.limit, self.limit)
        return (up + 1) * gate * jax.nn.sigmoid(self.alpha * gate)

    def __call__(self, x):
        b, t, d = x.shape
        tokens = x.reshape(b * t, d)
        experts, weights = moe.route(tokens, self.router[...], self.router_bias[...], self.top_k)
        weights = weights.astype(x.dtype)
        args = (tokens, experts, weights, self.gate_up[...], self.gate_up_bias[...], self.down[...])
        mesh = self.shard.mesh
        if self.dense:
            out = moe.dense_experts(*args, self.activation)
        elif mesh is None or mesh.size == 1:
            out = moe.grouped_experts(*args, self.activation)
        else:
            out = moe.sharded_grouped_experts(mesh, self.shard.rules, *args, self.activation)
        out = out + moe.down_bias_term(experts, weights, self.down_bias[...])
        return out.astype(x.dtype).reshape(b, t, d)


class Block(nnx.Module):
    def __init__(self, cfg: GptOssConfig, layer: int, dtype, sharder: layers.Sharder, rngs: nnx.Rngs):
        self.attn_norm = norm(cfg, dtype)
        self.attn = layers.Attention(
            hidden=cfg.hidden_size, heads=cfg.num_heads, kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
            scale=cfg.head_dim**-0.5, rope=cfg.rope, window=cfg.window(layer), bias=True, sinks=True,
            dtype=dtype, sharder=sharder, rngs=rngs,
        )  # fmt: skip
        self.mlp_norm = norm(cfg, dtype)
        self.experts = Experts(cfg, dtype, sharder, rngs)

    def __call__(self, x, **attention_inputs):
        h, cache = self.attn(self.attn_norm(x), **attention_inputs)
        x = x + h
        return x + self.experts(self.mlp_norm(x)), cache


class GptOss(DecoderLM):
    """GptOssForCausalLM. Call as model(tokens, attention_mask=, capture=, stop_at_layer=, cache=)."""

    def __init__(self, cfg: GptOssConfig, *, dtype=jnp.bfloat16, rngs: nnx.Rngs, sharder: layers.Sharder | None = None):
        sharder = sharder or layers.no_sharding()
        super().__init__(
            cfg, dtype=dtype, rngs=rngs, sharder=sharder,
            block=lambda i: Block(cfg, i, dtype, sharder, rngs), norm=lambda: norm(cfg, dtype),
        )  # fmt: skip


def hf_tensors(cfg: GptOssConfig) -> dict:
    """Our parameter path -> the Hugging Face tensor(s) it is read from, and how (layers stacked as
    LayerStack holds them).

    Expert weights may be stored dequantised or as MXFP4 `*_blocks` + `*_scales`;
    the checkpoint reader resolves either under the same key.
    """
    e, d, f = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    table = outer_tensors(cfg)
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}.", f"blocks.{i}."
        table |= attention_tensors(hf, ours, cfg, bias=True)
        table |= {
            ours + "attn.sinks": HFTensor(hf + "self_attn.sinks"),
            ours + "attn_norm.weight": HFTensor(hf + "input_layernorm.weight"),
            ours + "mlp_norm.weight": HFTensor(hf + "post_attention_layernorm.weight"),
            ours + "experts.router": HFTensor(hf + "mlp.router.weight", perm=(1, 0)),
            ours + "experts.router_bias": HFTensor(hf + "mlp.router.bias"),
            # gate_up_proj [E, D, 2F], gate in even and up in odd columns -> [E, D, F, 2]
            ours + "experts.gate_up": HFTensor(hf + "mlp.experts.gate_up_proj", split=((e,), (d,), (f, 2))),
            ours + "experts.gate_up_bias": HFTensor(hf + "mlp.experts.gate_up_proj_bias", split=((e,), (f, 2))),
            ours + "experts.down": HFTensor(hf + "mlp.experts.down_proj"),
            ours + "experts.down_bias": HFTensor(hf + "mlp.experts.down_proj_bias"),
        }
    return stack_layers(table, cfg.num_layers, layer_period(cfg))
