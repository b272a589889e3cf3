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
from collections.abc import Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from emjax.models import hf_config, layers
from emjax.models.checkpoint import HFTensor

ARCHITECTURE = "Gemma2ForCausalLM"
MODEL_TYPE = "gemma2"
SLIDING, FULL = "sliding_attention", "full_attention"


@dataclasses.dataclass(frozen=True)
class Gemma2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    query_pre_attn_scalar: float
    sliding_window: int
    layer_types: tuple[str, ...]
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attn_logit_softcap: float | None = 50.0
    final_logit_softcap: float | None = 30.0
    tie_word_embeddings: bool = True

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads {self.num_kv_heads}"
            )
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        unknown = set(self.layer_types) - {SLIDING, FULL}
        if unknown:
            raise ValueError(f"unknown layer_types {sorted(unknown)}; expected {SLIDING!r} or {FULL!r}")

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
        num_layers = int(get("num_hidden_layers"))
        # Older config.json files predate `layer_types`; Gemma-2 alternates, layer 0 sliding.
        layer_types = hf.get("layer_types") or [SLIDING if i % 2 == 0 else FULL for i in range(num_layers)]
        num_heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        return cls(
            vocab_size=int(get("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(get("intermediate_size")),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(get("num_key_value_heads", num_heads)),
            head_dim=int(get("head_dim", hidden // num_heads)),
            query_pre_attn_scalar=float(get("query_pre_attn_scalar")),
            sliding_window=int(get("sliding_window")),
            layer_types=tuple(layer_types),
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            rope_theta=hf_config.rope_theta(hf),
            attn_logit_softcap=hf.get("attn_logit_softcapping"),
            final_logit_softcap=hf.get("final_logit_softcapping"),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        )

    def to_hf(self) -> dict[str, Any]:
        """The config.json fields transformers' Gemma2ForCausalLM reads."""
        return {
            "architectures": [ARCHITECTURE],
            "model_type": MODEL_TYPE,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            # transformers validates this field as an int
            "query_pre_attn_scalar": int(q) if (q := self.query_pre_attn_scalar).is_integer() else q,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "attn_logit_softcapping": self.attn_logit_softcap,
            "final_logit_softcapping": self.final_logit_softcap,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_activation": "gelu_pytorch_tanh",
        }

    def window(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_types[layer] == SLIDING else None


@flax.struct.dataclass
class Output:
    logits: jax.Array | None  # [B, T, V] fp32, None when stopped early
    captured: dict[int, jax.Array]  # layer -> residual stream after that block, [B, T, D]
    cache: layers.KVCache | None


class Attention(nnx.Module):
    def __init__(self, cfg: Gemma2Config, layer: int, dtype, sharder: layers.Sharder, rngs: nnx.Rngs):
        d, h, g, k = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q = layers.param(rngs, (d, h, k), ("embed", "heads", "head_dim"), dtype)
        self.k = layers.param(rngs, (d, g, k), ("embed", "kv_heads", "head_dim"), dtype)
        self.v = layers.param(rngs, (d, g, k), ("embed", "kv_heads", "head_dim"), dtype)
        self.o = layers.param(rngs, (h, k, d), ("heads", "head_dim", "embed"), dtype, fan_in=h * k)
        self.scale = cfg.query_pre_attn_scalar**-0.5
        self.logit_cap = cfg.attn_logit_softcap
        self.window = cfg.window(layer)
        self.rope_theta = cfg.rope_theta
        self.shard = sharder

    def __call__(self, x, *, positions, q_index, new_index, cache: layers.LayerCache | None, start):
        """x [B, T, D]; q_index [B, T] token indices; new_index the same with padding as -1."""
        shard = self.shard
        q = shard(jnp.einsum("btd,dhk->bthk", x, self.q[...]), "batch", None, "heads", None)
        k = shard(jnp.einsum("btd,dgk->btgk", x, self.k[...]), "batch", None, "kv_heads", None)
        v = shard(jnp.einsum("btd,dgk->btgk", x, self.v[...]), "batch", None, "kv_heads", None)
        inv_freq = layers.rope_inverse_frequencies(q.shape[-1], self.rope_theta)
        q = layers.apply_rope(q, positions, inv_freq)
        k = layers.apply_rope(k, positions, inv_freq)
        if cache is None:
            keys, values, key_index, new_cache = k, v, new_index, None
        else:
            # Attend over the cache as it was plus the new tokens, then write them:
            # a ring may have to overwrite slots that these queries still see.
            keys = jnp.concatenate([cache.k, k.astype(cache.k.dtype)], axis=1)
            values = jnp.concatenate([cache.v, v.astype(cache.v.dtype)], axis=1)
            key_index = jnp.concatenate([cache.index, new_index], axis=1)
            new_cache = layers.update_layer_cache(cache, k, v, new_index, start, ring=self.window is not None)
            new_cache = layers.shard_layer_cache(new_cache, shard)
        out = layers.attention(
            q,
            keys,
            values,
            q_index=q_index,
            k_index=key_index,
            scale=self.scale,
            logit_cap=self.logit_cap,
            window=self.window,
        )
        return jnp.einsum("bthk,hkd->btd", out, self.o[...]), new_cache


class MLP(nnx.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, cfg: Gemma2Config, dtype, sharder: layers.Sharder, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate = layers.param(rngs, (d, f), ("embed", "mlp"), dtype)
        self.up = layers.param(rngs, (d, f), ("embed", "mlp"), dtype)
        self.down = layers.param(rngs, (f, d), ("mlp", "embed"), dtype)
        self.shard = sharder

    def __call__(self, x):
        gate = jax.nn.gelu(x @ self.gate[...], approximate=True)
        hidden = self.shard(gate * (x @ self.up[...]), "batch", None, "mlp")
        return hidden @ self.down[...]


class Norm(nnx.Module):
    """Gemma RMSNorm: x / rms(x) * (1 + w), in fp32, cast back."""

    def __init__(self, cfg: Gemma2Config, dtype):
        self.weight = nnx.Param(jnp.zeros((cfg.hidden_size,), dtype), logical_axes=("norm",))
        self.eps = cfg.rms_norm_eps

    def __call__(self, x):
        return layers.rms_norm(x, self.weight[...], self.eps, offset=1.0)


class Block(nnx.Module):
    def __init__(self, cfg: Gemma2Config, layer: int, dtype, sharder: layers.Sharder, rngs: nnx.Rngs):
        self.pre_attn_norm = Norm(cfg, dtype)
        self.attn = Attention(cfg, layer, dtype, sharder, rngs)
        self.post_attn_norm = Norm(cfg, dtype)
        self.pre_mlp_norm = Norm(cfg, dtype)
        self.mlp = MLP(cfg, dtype, sharder, rngs)
        self.post_mlp_norm = Norm(cfg, dtype)
        self.shard = sharder

    def __call__(self, x, **attn_kwargs):
        h, cache = self.attn(self.pre_attn_norm(x), **attn_kwargs)
        x = x + self.post_attn_norm(h)
        x = x + self.post_mlp_norm(self.mlp(self.pre_mlp_norm(x)))
        return self.shard(x, "batch", None, None), cache


class Gemma2(nnx.Module):
    """Gemma2ForCausalLM. Call as model(tokens, attention_mask=, capture=, stop_at_layer=, cache=)."""

    def __init__(self, cfg: Gemma2Config, *, dtype=jnp.bfloat16, rngs: nnx.Rngs, sharder: layers.Sharder | None = None):
        sharder = sharder or layers.no_sharding()
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.embed = layers.param(
            rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype, fan_in=cfg.hidden_size
        )
        self.blocks = nnx.List([Block(cfg, i, dtype, sharder, rngs) for i in range(cfg.num_layers)])
        self.final_norm = Norm(cfg, dtype)
        if not cfg.tie_word_embeddings:
            self.head = layers.param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dtype)
        self.shard = sharder

    def init_cache(self, batch: int, max_len: int) -> layers.KVCache:
        """An empty cache for `max_len` tokens (prompt, padding and generated tokens together)."""
        cfg = self.config
        caches = []
        for i in range(cfg.num_layers):
            window = cfg.window(i)
            slots = max_len if window is None else min(window, max_len)
            caches.append(layers.init_layer_cache(batch, slots, cfg.num_kv_heads, cfg.head_dim, self.dtype, self.shard))
        return layers.KVCache(
            layers=tuple(caches),
            length=jnp.zeros((), jnp.int32),
            next_position=self.shard(jnp.zeros((batch,), jnp.int32), "batch"),
            max_len=max_len,
        )

    def __call__(
        self,
        tokens: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        capture: Sequence[int] = (),
        stop_at_layer: int | None = None,
        cache: layers.KVCache | None = None,
    ) -> Output:
        cfg = self.config
        batch, length = tokens.shape
        stop = cfg.num_layers if stop_at_layer is None else int(stop_at_layer)
        if not 0 < stop <= cfg.num_layers:
            raise ValueError(f"stop_at_layer={stop_at_layer} must be in 1..{cfg.num_layers}")
        bad = [layer for layer in capture if not 0 <= layer < stop]
        if bad:
            raise ValueError(
                f"capture layers {bad} are outside 0..{stop - 1} "
                f"(num_layers={cfg.num_layers}, stop_at_layer={stop_at_layer})"
            )
        if cache is not None and stop < cfg.num_layers:
            raise ValueError("decoding with a cache needs the whole network (stop_at_layer=None)")
        if attention_mask is None:
            attention_mask = jnp.ones((batch, length), jnp.int32)
        start = jnp.zeros((), jnp.int32) if cache is None else cache.length
        q_index = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))
        new_index = jnp.where(attention_mask > 0, q_index, -1)
        positions = layers.positions_from_mask(attention_mask, None if cache is None else cache.next_position)

        table = self.embed[...]
        # Gather rows from a table split over vocab only (FSDP all-gathers the embed dim
        # first); a lookup into the 2-D split table makes XLA replicate it whole.
        # Gemma multiplies by sqrt(d_model) rounded to the activation dtype (sqrt(3584) is 59.75 in bf16).
        x = self.shard(table, "vocab", None)[tokens] * jnp.asarray(math.sqrt(cfg.hidden_size), self.dtype)
        x = self.shard(x, "batch", None, None)
        captured, new_caches = {}, []
        for i in range(stop):
            x, layer_cache = self.blocks[i](
                x,
                positions=positions,
                q_index=q_index,
                new_index=new_index,
                cache=None if cache is None else cache.layers[i],
                start=start,
            )
            new_caches.append(layer_cache)
            if i in capture:
                captured[i] = x

        new_cache = None
        if cache is not None:
            new_cache = layers.KVCache(
                layers=tuple(new_caches),
                length=start + length,
                next_position=cache.next_position + jnp.sum(attention_mask > 0, axis=1).astype(jnp.int32),
                max_len=cache.max_len,
            )
        if stop < cfg.num_layers:
            return Output(logits=None, captured=captured, cache=None)
        x = self.final_norm(x)
        head = table.T if cfg.tie_word_embeddings else self.head[...]
        logits = jnp.einsum("btd,dv->btv", x, head, preferred_element_type=jnp.float32)
        logits = layers.softcap(logits, cfg.final_logit_softcap)
        if cache is not None:
            # Writing past the cache would be clamped silently by dynamic_update_slice: make it loud.
            logits = jnp.where(start + length > cache.max_len, jnp.nan, logits)
        return Output(logits=self.shard(logits, "batch", None, "vocab"), captured=captured, cache=new_cache)


def hf_tensors(cfg: Gemma2Config) -> dict[str, HFTensor]:
    """Our parameter path -> the Hugging Face tensor it is read from, and how."""
    h, g, k, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size

    def heads_in(key: str, n: int) -> HFTensor:  # [n*k, d] -> [d, n, k]
        return HFTensor(key, split=((n, k), (d,)), perm=(2, 0, 1))

    table = {"embed": HFTensor("model.embed_tokens.weight"), "final_norm.weight": HFTensor("model.norm.weight")}
    if not cfg.tie_word_embeddings:
        table["head"] = HFTensor("lm_head.weight", perm=(1, 0))
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}.", f"blocks.{i}."
        table |= {
            ours + "attn.q": heads_in(hf + "self_attn.q_proj.weight", h),
            ours + "attn.k": heads_in(hf + "self_attn.k_proj.weight", g),
            ours + "attn.v": heads_in(hf + "self_attn.v_proj.weight", g),
            # o_proj [d, h*k] -> [h, k, d]
            ours + "attn.o": HFTensor(hf + "self_attn.o_proj.weight", split=((d,), (h, k)), perm=(1, 2, 0)),
            ours + "mlp.gate": HFTensor(hf + "mlp.gate_proj.weight", perm=(1, 0)),
            ours + "mlp.up": HFTensor(hf + "mlp.up_proj.weight", perm=(1, 0)),
            ours + "mlp.down": HFTensor(hf + "mlp.down_proj.weight", perm=(1, 0)),
            ours + "pre_attn_norm.weight": HFTensor(hf + "input_layernorm.weight"),
            ours + "post_attn_norm.weight": HFTensor(hf + "post_attention_layernorm.weight"),
            ours + "pre_mlp_norm.weight": HFTensor(hf + "pre_feedforward_layernorm.weight"),
            ours + "post_mlp_norm.weight": HFTensor(hf + "post_feedforward_layernorm.weight"),
        }
    return table
