"""Blocks shared by the model families: parameters with logical axes, norms,
rotary embeddings, grouped-query attention and the KV cache.

Each family's file (gemma2.py, ...) composes these and keeps its own quirks
visible; the maths here is the part that is the same everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from emjax import distributed

F32 = jnp.float32


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
        self.mesh = mesh
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


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, *, offset: float) -> jax.Array:
    """RMSNorm in fp32; Gemma scales by (1 + w) (offset=1), Llama by w (offset=0)."""
    x32 = x.astype(F32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * (offset + weight.astype(F32))).astype(x.dtype)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    return x if cap is None else jnp.tanh(x / cap) * cap


def rope_inverse_frequencies(head_dim: int, theta: float) -> jax.Array:
    exponents = jnp.arange(0, head_dim, 2, dtype=F32) / head_dim
    return 1.0 / (theta**exponents)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array, *, attention_factor: float = 1.0) -> jax.Array:
    """Rotary embedding in the split-halves convention of Hugging Face checkpoints.

    x: [B, T, heads, head_dim]; positions: [B, T]. Angles are formed in fp32 at
    highest precision so long positions keep their phase.
    """
    angles = positions.astype(F32)[..., None] * inv_freq  # [B, T, head_dim/2]
    cos = (jnp.cos(angles) * attention_factor)[:, :, None, :]
    sin = (jnp.sin(angles) * attention_factor)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(F32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


@flax.struct.dataclass
class LayerCache:
    """Keys and values of one attention layer.

    `index` holds each slot's token index in the sequence (padding and empty
    slots are -1). Full-attention layers keep `max_len` slots; sliding-window
    layers keep a ring of `window` slots, enough for every query that follows.
    """

    k: jax.Array  # [B, S, kv_heads, head_dim]
    v: jax.Array  # [B, S, kv_heads, head_dim]
    index: jax.Array  # [B, S] int32


@flax.struct.dataclass
class KVCache:
    layers: tuple[LayerCache, ...]
    length: jax.Array  # scalar int32: token index of the next token (padding included)
    next_position: jax.Array  # [B] int32: rotary position of each row's next real token
    max_len: int = flax.struct.field(pytree_node=False)  # tokens it was made for


def shard_layer_cache(cache: LayerCache, shard: Sharder) -> LayerCache:
    """Keep every cache split over the batch and kv heads, as the keys it stores."""
    return LayerCache(
        k=shard(cache.k, "batch", None, "kv_heads", None),
        v=shard(cache.v, "batch", None, "kv_heads", None),
        index=shard(cache.index, "batch", None),
    )


def init_layer_cache(batch: int, slots: int, kv_heads: int, head_dim: int, dtype, shard: Sharder) -> LayerCache:
    zeros = jnp.zeros((batch, slots, kv_heads, head_dim), dtype)
    return shard_layer_cache(LayerCache(k=zeros, v=zeros, index=jnp.full((batch, slots), -1, jnp.int32)), shard)


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
) -> jax.Array:
    """Grouped-query attention with causal, padding and sliding-window masks.

    q: [B, T, H, K]; k, v: [B, S, G, K] with H a multiple of G. q_index [B, T]
    and k_index [B, S] are token indices; a key index of -1 is masked (padding
    or an empty cache slot). A key is visible when 0 <= q - k (< window).
    Logits are scaled, soft-capped (before the mask, as Gemma-2 does) and
    softmaxed in fp32.
    """
    b, t, h, d = q.shape
    g = k.shape[2]
    q = q.reshape(b, t, g, h // g, d)
    logits = jnp.einsum("btgrd,bsgd->bgrts", q, k, preferred_element_type=F32) * scale
    logits = softcap(logits, logit_cap)
    delta = q_index[:, :, None] - k_index[:, None, :]  # [B, T, S]
    visible = (k_index[:, None, :] >= 0) & (delta >= 0)
    if window is not None:
        visible &= delta < window
    logits = jnp.where(visible[:, None, None], logits, jnp.finfo(F32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bgrts,bsgd->btgrd", probs.astype(v.dtype), v, preferred_element_type=F32)
    return out.reshape(b, t, h, d).astype(v.dtype)


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
