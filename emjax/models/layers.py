"""Blocks shared by the model families: parameters with logical axes, norms,
rotary embeddings, grouped-query attention and the KV cache.

Each family's file (gemma2.py, ...) composes these and keeps its own quirks
visible; the maths here is the part that is the same everywhere.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh, NamedSharding

from emjax import distributed
from emjax.precision import matmul_precision

F32 = jnp.float32
# Values tagged with jax.ad_checkpoint.checkpoint_name for remat policies that name what to keep
# (emjax.train.REMAT_POLICIES["attention"]): the rotated q, k and v, and attention's output.
ATTENTION_SAVE_NAMES = ("query", "key", "value", "attention_out")


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str], dtype, init=None, *, fan_in: int | None = None):
    """A parameter declared once with its shape, dtype, logical axes and initialiser.

    The default initialiser is a truncated normal with std 1/sqrt(fan_in)
    (fan_in defaults to the first dimension).
    """
    shape = tuple(int(s) for s in shape)
    if init is None:
        std = (fan_in or shape[0]) ** -0.5
        value = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, F32)
    else:
        value = init(rngs.params(), shape, F32)
    return nnx.Param(value.astype(dtype), logical_axes=tuple(axes))


class Sharder:
    """Applies activation sharding constraints when the model lives on a mesh.

    Logical names inside raw jax.lax calls mean nothing to XLA, so activations
    get explicit constraints at block boundaries; without a mesh this is a no-op.
    """

    def __init__(self, mesh: Mesh | None, rules=None):
        self.mesh = None if mesh is None else distributed.auto_mesh(mesh)
        self.rules = rules

    def __call__(self, x: jax.Array, *logical_axes: str | None) -> jax.Array:
        if self.mesh is None or self.mesh.size == 1:
            return x
        spec = distributed.logical_to_spec(logical_axes, x.shape, self.mesh, self.rules, what="activation")
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

    # Static attributes of an NNX module must be hashable.
    def __hash__(self):
        return hash((self.mesh, tuple(sorted((self.rules or {}).items()))))

    def __eq__(self, other):
        return isinstance(other, Sharder) and (self.mesh, self.rules) == (other.mesh, other.rules)


def no_sharding() -> Sharder:
    return Sharder(None)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, *, offset: float, cast_first: bool = False) -> jax.Array:
    """RMSNorm in fp32. Gemma scales by (1 + w) (offset=1), Llama and gpt-oss by w (offset=0).

    Llama casts the normalised input back to its dtype before the weight
    multiply (cast_first); Gemma and gpt-oss multiply in fp32, then cast.
    """
    x32 = x.astype(F32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if cast_first:
        return (offset + weight) * normed.astype(x.dtype)
    return (normed * (offset + weight.astype(F32))).astype(x.dtype)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    return x if cap is None else jnp.tanh(x / cap) * cap


@dataclasses.dataclass(frozen=True)
class Rope:
    """Rotary embedding frequencies: plain, `llama3` scaling or YaRN, as in config.json."""

    head_dim: int
    theta: float
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 8192  # llama3, yarn
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    truncate: bool = True  # yarn: round the correction range to whole dimensions
    attention_factor: float | None = None  # yarn: scales cos and sin

    @classmethod
    def from_hf(cls, hf, head_dim: int, source: str = "config.json") -> Rope:
        from emjax.models import hf_config

        theta = hf_config.rope_theta(hf)
        scaling = hf_config.rope_scaling(hf)
        if scaling is None:
            return cls(head_dim, theta)
        kind = scaling["rope_type"]
        if kind not in ("llama3", "yarn"):
            raise ValueError(f"{source}: rope_type {kind!r} is not supported (default, llama3, yarn are)")
        known = {f.name for f in dataclasses.fields(cls)} - {"head_dim", "theta", "kind"}
        kwargs = {k: v for k, v in scaling.items() if k in known and v is not None}
        return cls(head_dim, theta, kind, **kwargs)

    def to_hf(self) -> dict[str, Any]:
        """rope_theta, rope_type and the scaling fields of this kind, as config.json spells them."""
        fields = {
            "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
            "yarn": ("factor", "beta_fast", "beta_slow", "truncate", "original_max_position_embeddings"),
        }.get(self.kind, ())
        return {"rope_theta": self.theta, "rope_type": self.kind} | {name: getattr(self, name) for name in fields}

    def frequencies(self) -> tuple[np.ndarray, float]:
        """(inverse frequencies [head_dim / 2], factor on cos and sin), computed in float64 then fp32."""
        dim = self.head_dim
        inv_freq = 1.0 / self.theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        if self.kind == "llama3":
            low_wavelen = self.original_max_position_embeddings / self.low_freq_factor
            high_wavelen = self.original_max_position_embeddings / self.high_freq_factor
            wavelen = 2 * math.pi / inv_freq
            scaled = np.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
            smooth = (self.original_max_position_embeddings / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor
            )
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
        if self.kind == "yarn":
            return self._yarn(inv_freq)
        return inv_freq.astype(np.float32), 1.0

    def _yarn(self, inv_freq: np.ndarray) -> tuple[np.ndarray, float]:
        dim, base = self.head_dim, self.theta

        def correction_dim(rotations):
            return (
                dim * math.log(self.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))
            )

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # avoid a zero-width ramp
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp
        inv_freq = inv_freq / self.factor * (1 - extrapolation) + inv_freq * extrapolation
        factor = self.attention_factor
        if factor is None:
            factor = 0.1 * math.log(self.factor) + 1.0 if self.factor > 1 else 1.0
        return inv_freq.astype(np.float32), float(factor)


def apply_rope(x: jax.Array, positions: jax.Array, rope: Rope) -> jax.Array:
    """Rotary embedding in the split-halves convention of Hugging Face checkpoints.

    x: [B, T, heads, head_dim]; positions: [B, T]. Angles are formed in fp32
    from fp32 frequencies, as the reference does.
    """
    inv_freq, factor = rope.frequencies()
    angles = positions.astype(F32)[..., None] * jnp.asarray(inv_freq)  # [B, T, head_dim/2]
    cos = (jnp.cos(angles) * factor)[:, :, None, :]
    sin = (jnp.sin(angles) * factor)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(F32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


@flax.struct.dataclass
class LayerCache:
    """Keys and values of one attention layer, or of every layer group at one position of a
    LayerStack (then with a layer-group axis after the batch: [B, groups, S, ...]).

    `index` holds each slot's token index in the sequence (padding and empty
    slots are -1). Full-attention layers keep `max_len` slots; sliding-window
    layers keep a ring of `window` slots, enough for every query that follows.
    """

    k: jax.Array  # [B, S, kv_heads, head_dim]
    v: jax.Array  # [B, S, kv_heads, head_dim]
    index: jax.Array  # [B, S] int32


@flax.struct.dataclass
class KVCache:
    layers: tuple[LayerCache, ...]  # one per position of the model's layer groups (DecoderLM.init_cache)
    length: jax.Array  # scalar int32: token index of the next token (padding included)
    next_position: jax.Array  # [B] int32: rotary position of each row's next real token
    max_len: int = flax.struct.field(pytree_node=False)  # tokens it was made for


def shard_layer_cache(cache: LayerCache, shard: Sharder) -> LayerCache:
    """Keep every cache split over the batch and kv heads, as the keys it stores."""
    groups = ("layers",) if cache.index.ndim == 3 else ()
    return LayerCache(
        k=shard(cache.k, "batch", *groups, None, "kv_heads", None),
        v=shard(cache.v, "batch", *groups, None, "kv_heads", None),
        index=shard(cache.index, "batch", *groups, None),
    )


def init_layer_cache(
    batch: int, slots: int, kv_heads: int, head_dim: int, dtype, shard: Sharder, *, groups: int | None = None
) -> LayerCache:
    """An empty cache of one layer, or of `groups` stacked layers ([B, groups, slots, ...])."""
    stack = () if groups is None else (groups,)
    zeros = jnp.zeros((batch, *stack, slots, kv_heads, head_dim), dtype)
    index = jnp.full((batch, *stack, slots), -1, jnp.int32)
    return shard_layer_cache(LayerCache(k=zeros, v=zeros, index=index), shard)


def update_layer_cache(cache: LayerCache, k: jax.Array, v: jax.Array, index: jax.Array, start: jax.Array, ring: bool):
    """Write T new tokens (token indices start..start+T-1) into the cache.

    A full cache writes them at slots start..start+T-1. A ring keeps only the
    last min(T, slots) of them at slot (token index mod slots), so the scatter
    never writes one slot twice.
    """
    slots = cache.k.shape[1]
    if not ring:
        at = (0, start, 0, 0)
        return LayerCache(
            k=jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), at),
            v=jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), at),
            index=jax.lax.dynamic_update_slice(cache.index, index, (0, start)),
        )
    t = k.shape[1]
    keep = min(t, slots)
    where = (start + t - keep + jnp.arange(keep)) % slots
    return LayerCache(
        k=cache.k.at[:, where].set(k[:, t - keep :].astype(cache.k.dtype)),
        v=cache.v.at[:, where].set(v[:, t - keep :].astype(cache.v.dtype)),
        index=cache.index.at[:, where].set(index[:, t - keep :]),
    )


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_index: jax.Array,
    k_index: jax.Array,
    scale: float,
    logit_cap: float | None = None,
    window: int | None = None,
    sinks: jax.Array | None = None,
    segments: jax.Array | None = None,
) -> jax.Array:
    """Grouped-query attention with causal, padding and sliding-window masks.

    q: [B, T, H, K]; k, v: [B, S, G, K] with H a multiple of G. q_index [B, T]
    and k_index [B, S] are token indices; a key index of -1 is masked (padding
    or an empty cache slot). A key is visible when 0 <= q - k (< window).
    Logits are scaled, soft-capped (before the mask, as Gemma-2 does) and
    softmaxed in fp32. `sinks` [H] (gpt-oss) adds one learned logit per head
    to the softmax denominator. `segments` [B, T] (packed rows, no cache: S == T)
    keeps each token's attention inside its own example.
    """
    b, t, h, d = q.shape
    g = k.shape[2]
    q = q.reshape(b, t, g, h // g, d)
    logits = jnp.einsum(
        "btgrd,bsgd->bgrts", q, k, preferred_element_type=F32, precision=matmul_precision(q.dtype, k.dtype)
    )
    logits = logits * scale
    logits = softcap(logits, logit_cap)
    delta = q_index[:, :, None] - k_index[:, None, :]  # [B, T, S]
    visible = (k_index[:, None, :] >= 0) & (delta >= 0)
    if window is not None:
        visible &= delta < window
    if segments is not None:
        visible &= segments[:, :, None] == segments[:, None, :]
    logits = jnp.where(visible[:, None, None], logits, jnp.finfo(F32).min)
    if sinks is None:
        probs = jax.nn.softmax(logits, axis=-1)
    else:
        sink = sinks.astype(F32).reshape(1, g, h // g, 1, 1)
        top = jnp.maximum(jnp.max(logits, axis=-1, keepdims=True), sink)
        weights = jnp.exp(logits - top)
        probs = weights / (jnp.sum(weights, axis=-1, keepdims=True) + jnp.exp(sink - top))
    precision = matmul_precision(v.dtype)
    out = jnp.einsum("bgrts,bsgd->btgrd", probs.astype(v.dtype), v, preferred_element_type=F32, precision=precision)
    return out.reshape(b, t, h, d).astype(v.dtype)


def positions_in_segments(segments: jax.Array) -> jax.Array:
    """Rotary positions of packed rows: each example (a run of equal segment ids) starts at 0."""
    index = jnp.broadcast_to(jnp.arange(segments.shape[1], dtype=jnp.int32), segments.shape)
    starts = jnp.concatenate([jnp.ones_like(segments[:, :1], bool), segments[:, 1:] != segments[:, :-1]], axis=1)
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


def project(module: nnx.Module, name: str, x: jax.Array, spec: str) -> jax.Array:
    """x through the weight `module.<name>` (an einsum), plus that weight's LoRA
    adapter when emjax.lora has attached one (module.lora[name])."""
    weight = getattr(module, name)[...]
    y = jnp.einsum(spec, x, weight, precision=matmul_precision(x.dtype, weight.dtype))
    adapters = getattr(module, "lora", None)
    if adapters is not None and name in adapters:
        y = y + adapters[name](x).astype(y.dtype)
    return y


def positions_from_mask(attention_mask: jax.Array, start: jax.Array | None = None) -> jax.Array:
    """Rotary positions that count only real tokens, so left padding does not shift them.

    Padding tokens take the position of the last real token before them (0 at the start).
    """
    pos = jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1
    pos = jnp.maximum(pos, 0)
    return pos if start is None else pos + start[:, None]


def dtype_of(name: Any):
    """A jnp dtype from a name ("bfloat16", "float32", ...) or a dtype."""
    try:
        return jnp.dtype(name)
    except TypeError as e:
        raise ValueError(f"unknown dtype {name!r}") from e


class Attention(nnx.Module):
    """Grouped-query self-attention with rotary embeddings, an optional window,
    soft-cap (Gemma-2), biases and sinks (gpt-oss), reading and writing a KV cache."""

    def __init__(
        self, *, hidden: int, heads: int, kv_heads: int, head_dim: int, scale: float, rope: Rope,
        window: int | None, dtype, sharder: Sharder, rngs: nnx.Rngs,
        logit_cap: float | None = None, bias: bool = False, sinks: bool = False,
    ):  # fmt: skip
        d, h, g, k = hidden, heads, kv_heads, head_dim
        self.q = param(rngs, (d, h, k), ("embed", "heads", "head_dim"), dtype)
        self.k = param(rngs, (d, g, k), ("embed", "kv_heads", "head_dim"), dtype)
        self.v = param(rngs, (d, g, k), ("embed", "kv_heads", "head_dim"), dtype)
        self.o = param(rngs, (h, k, d), ("heads", "head_dim", "embed"), dtype, fan_in=h * k)
        self.bias = bias
        if bias:
            self.q_bias = param(rngs, (h, k), ("heads", "head_dim"), dtype, init=zeros)
            self.k_bias = param(rngs, (g, k), ("kv_heads", "head_dim"), dtype, init=zeros)
            self.v_bias = param(rngs, (g, k), ("kv_heads", "head_dim"), dtype, init=zeros)
            self.o_bias = param(rngs, (d,), ("norm",), dtype, init=zeros)
        self.sinks = param(rngs, (h,), ("heads",), dtype, init=zeros) if sinks else None
        self.scale, self.rope, self.window, self.logit_cap = scale, rope, window, logit_cap
        self.shard = sharder

    def __call__(self, x, *, positions, q_index, new_index, cache: LayerCache | None, start, segments=None):
        """x [B, T, D]; q_index [B, T] token indices; new_index the same with padding as -1."""
        shard = self.shard
        q = project(self, "q", x, "btd,dhk->bthk")
        k = project(self, "k", x, "btd,dgk->btgk")
        v = project(self, "v", x, "btd,dgk->btgk")
        if self.bias:
            q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
        q = checkpoint_name(shard(apply_rope(q, positions, self.rope), "batch", None, "heads", None), "query")
        k = checkpoint_name(shard(apply_rope(k, positions, self.rope), "batch", None, "kv_heads", None), "key")
        v = checkpoint_name(shard(v, "batch", None, "kv_heads", None), "value")
        if cache is None:
            keys, values, key_index, new_cache = k, v, new_index, None
        elif x.shape[1] == 1:
            # One new token (decoding): write it, then attend over the cache, without copying the
            # cache for each token. In a ring it replaces the token `slots` back, which it cannot see.
            written = update_layer_cache(cache, k, v, new_index, start, ring=self.window is not None)
            new_cache = shard_layer_cache(written, shard)
            keys, values, key_index = new_cache.k, new_cache.v, new_cache.index
        else:
            # Attend over the cache as it was plus the new tokens, then write them:
            # a ring may have to overwrite slots that these queries still see.
            keys = jnp.concatenate([cache.k, k.astype(cache.k.dtype)], axis=1)
            values = jnp.concatenate([cache.v, v.astype(cache.v.dtype)], axis=1)
            key_index = jnp.concatenate([cache.index, new_index], axis=1)
            new_cache = update_layer_cache(cache, k, v, new_index, start, ring=self.window is not None)
            new_cache = shard_layer_cache(new_cache, shard)
        out = attention(
            q, keys, values, q_index=q_index, k_index=key_index, scale=self.scale, logit_cap=self.logit_cap,
            window=self.window, sinks=None if self.sinks is None else self.sinks[...], segments=segments,
        )  # fmt: skip
        out = project(self, "o", checkpoint_name(out, "attention_out"), "bthk,hkd->btd")
        return (out + self.o_bias[...] if self.bias else out), new_cache


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis (see rms_norm); the weight starts where the norm only normalises:
    0 with offset=1 (Gemma's 1 + w), 1 with offset=0."""

    def __init__(self, hidden: int, eps: float, dtype, *, offset: float, cast_first: bool = False):
        self.weight = nnx.Param(jnp.full((hidden,), 1.0 - offset, dtype), logical_axes=("norm",))
        self.eps, self.offset, self.cast_first = eps, offset, cast_first

    def __call__(self, x):
        return rms_norm(x, self.weight[...], self.eps, offset=self.offset, cast_first=self.cast_first)


class GatedMLP(nnx.Module):
    """down(activation(gate(x)) * up(x)): GeGLU (Gemma-2), SwiGLU (Llama).

    `activation` must be a module-level function (it is part of the static graph).
    """

    def __init__(self, hidden: int, intermediate: int, activation, dtype, sharder: Sharder, rngs: nnx.Rngs):
        d, f = hidden, intermediate
        self.gate = param(rngs, (d, f), ("embed", "mlp"), dtype)
        self.up = param(rngs, (d, f), ("embed", "mlp"), dtype)
        self.down = param(rngs, (f, d), ("mlp", "embed"), dtype)
        self.activation = activation
        self.shard = sharder

    def __call__(self, x):
        gate = self.activation(project(self, "gate", x, "btd,df->btf"))
        hidden = self.shard(gate * project(self, "up", x, "btd,df->btf"), "batch", None, "mlp")
        return project(self, "down", hidden, "btf,fd->btd")


# Where emjax.lora attaches adapters: PEFT module name -> (block attribute holding the
# projection, the projection's weight, leading input dimensions of that weight). Every
# family's block holds an Attention as `attn` and (except gpt-oss's experts) a GatedMLP as `mlp`.
LORA_SITES = {
    "q_proj": ("attn", "q", 1),
    "k_proj": ("attn", "k", 1),
    "v_proj": ("attn", "v", 1),
    "o_proj": ("attn", "o", 2),  # [heads, head_dim, embed]
    "gate_proj": ("mlp", "gate", 1),
    "up_proj": ("mlp", "up", 1),
    "down_proj": ("mlp", "down", 1),
}
# Block attribute -> its Hugging Face module name (PEFT keys: model.layers.N.self_attn.q_proj...).
HF_MODULES = {"attn": "self_attn", "mlp": "mlp"}


def zeros(key, shape, dtype):
    return jnp.zeros(shape, dtype)
