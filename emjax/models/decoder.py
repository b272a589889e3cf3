"""The decoder-only language model every family shares: embed, blocks, final norm, head.

A family subclasses `DecoderLM`, passes its block and norm to the shared
constructor (which makes `embed`, `blocks`, `final_norm` and `head` when
untied), and overrides the two hooks where it differs: `scale_embeddings` (Gemma multiplies by sqrt(d_model)) and
`cap_logits` (Gemma-2 soft-caps the final logits).

The forward can also ablate directions from the residual stream (concept
ablation during fine-tuning, emjax.ablation): `ablate={layer: Q}` with Q
[k, d_model] orthonormal rows replaces the residual after block `layer` by
h - (h Q^T) Q before anything downstream (or `capture`) sees it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from emjax.models import layers
from emjax.models.layers import F32
from emjax.precision import matmul_precision


@flax.struct.dataclass
class Output:
    logits: jax.Array | None  # [B, T, V] fp32, None when stopped early
    captured: dict[int, jax.Array]  # layer -> residual stream after that block (and its ablation), [B, T, D]
    cache: layers.KVCache | None


class DecoderLM(nnx.Module):
    """model(tokens, attention_mask=, capture=, stop_at_layer=, cache=, segment_ids=, remat=, ablate=) -> Output.

    segment_ids [B, T] marks packed examples (0 is padding): attention stays
    inside each example and rotary positions restart at each. remat, a
    jax.checkpoint policy, recomputes each block's activations in the backward
    pass instead of storing them (training). ablate {layer: Q [k, d_model]},
    Q with orthonormal rows (emjax.ablation.orthonormal_basis), projects the
    span of Q out of the residual stream after block `layer`; the captured
    residual at that layer is the ablated one. None (default) is the plain
    forward, bit for bit.

    A family's config has num_layers, hidden_size, vocab_size, num_kv_heads,
    head_dim, tie_word_embeddings and window(layer); its blocks are called as
    block(x, **attention_inputs) -> (x, layer_cache).
    """

    def __init__(
        self,
        cfg,
        *,
        dtype,
        rngs: nnx.Rngs,
        sharder: layers.Sharder,
        block: Callable[[int], nnx.Module],
        norm: Callable[[], nnx.Module],
    ):
        """embed [vocab, embed], blocks block(0..num_layers-1), final_norm norm(), head [embed, vocab] when
        untied, created in this order (it fixes what a seeded init draws)."""
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.embed = layers.param(
            rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype, fan_in=cfg.hidden_size
        )
        self.blocks = nnx.List([block(i) for i in range(cfg.num_layers)])
        self.final_norm = norm()
        if not cfg.tie_word_embeddings:
            self.head = layers.param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dtype)
        self.shard = sharder

    def scale_embeddings(self, x: jax.Array) -> jax.Array:
        return x

    def cap_logits(self, logits: jax.Array) -> jax.Array:
        return logits

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
        segment_ids: jax.Array | None = None,
        remat: Callable[..., bool] | None = None,
        ablate: Mapping[int, jax.Array] | None = None,
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
        ablate = self._check_ablate(ablate, stop)
        if cache is not None and stop < cfg.num_layers:
            raise ValueError("decoding with a cache needs the whole network (stop_at_layer=None)")
        if remat is not None and cache is not None:
            raise ValueError("remat is for training; decoding with a cache stores nothing to recompute")
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids (packed rows) cannot be combined with a KV cache")
            if attention_mask is not None:
                raise ValueError("pass segment_ids or attention_mask, not both: segment 0 is the padding")
            attention_mask = (segment_ids > 0).astype(jnp.int32)
        if attention_mask is None:
            attention_mask = jnp.ones((batch, length), jnp.int32)
        start = jnp.zeros((), jnp.int32) if cache is None else cache.length
        q_index = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))
        new_index = jnp.where(attention_mask > 0, q_index, -1)
        if segment_ids is None:
            positions = layers.positions_from_mask(attention_mask, None if cache is None else cache.next_position)
        else:
            positions = layers.positions_in_segments(segment_ids)

        table = self.embed[...]
        # Gather rows from a table split over vocab only (FSDP all-gathers the embed dim
        # first); a lookup into the 2-D split table makes XLA replicate it whole.
        x = self.scale_embeddings(self.shard(table, "vocab", None)[tokens])
        x = self.shard(x, "batch", None, None)
        captured, new_caches = {}, []
        inputs = dict(positions=positions, q_index=q_index, new_index=new_index, start=start)
        if segment_ids is not None:
            inputs["segments"] = segment_ids
        for i in range(stop):
            layer_cache = None if cache is None else cache.layers[i]
            if remat is None:
                x, layer_cache = self.blocks[i](x, cache=layer_cache, **inputs)
            else:
                x, layer_cache = _checkpointed(self.blocks[i], x, inputs, remat)
            x = self.shard(x, "batch", None, None)
            if i in ablate:
                x = self.shard(project_out(x, ablate[i]), "batch", None, None)
            new_caches.append(layer_cache)
            if i in capture:
                captured[i] = x
        if stop < cfg.num_layers:
            return Output(logits=None, captured=captured, cache=None)

        x = self.final_norm(x)
        head = table.T if cfg.tie_word_embeddings else self.head[...]
        precision = matmul_precision(x.dtype, head.dtype)
        logits = jnp.einsum("btd,dv->btv", x, head, preferred_element_type=jnp.float32, precision=precision)
        logits = self.cap_logits(logits)
        new_cache = None
        if cache is not None:
            new_cache = layers.KVCache(
                layers=tuple(new_caches),
                length=start + length,
                next_position=cache.next_position + jnp.sum(attention_mask > 0, axis=1).astype(jnp.int32),
                max_len=cache.max_len,
            )
            # Writing past the cache would be clamped silently by dynamic_update_slice: make it loud.
            logits = jnp.where(start + length > cache.max_len, jnp.nan, logits)
        return Output(logits=self.shard(logits, "batch", None, "vocab"), captured=captured, cache=new_cache)

    def _check_ablate(self, ablate: Mapping[int, jax.Array] | None, stop: int) -> dict[int, jax.Array]:
        if not ablate:
            return {}
        bad = [layer for layer in ablate if not 0 <= layer < stop]
        if bad:
            raise ValueError(f"ablate layers {bad} are outside 0..{stop - 1} (num_layers={self.config.num_layers})")
        out = {}
        for layer, basis in ablate.items():
            if basis.ndim != 2 or basis.shape[1] != self.config.hidden_size:
                raise ValueError(
                    f"ablate[{layer}] has shape {tuple(basis.shape)}; expected [k, d_model={self.config.hidden_size}]"
                )
            out[int(layer)] = self.shard(basis, None, None)  # replicated: every shard projects its own rows
        return out


def project_out(x: jax.Array, basis: jax.Array) -> jax.Array:
    """x - (x Q^T) Q for Q = basis [k, D] with orthonormal rows, computed in fp32, cast back to x's dtype."""
    q = basis.astype(F32)
    x32 = x.astype(F32)
    coefficients = jnp.einsum("...d,kd->...k", x32, q, precision=jax.lax.Precision.HIGHEST)
    return (x32 - jnp.einsum("...k,kd->...d", coefficients, q, precision=jax.lax.Precision.HIGHEST)).astype(x.dtype)


def _checkpointed(block: nnx.Module, x: jax.Array, inputs: dict, policy) -> tuple[jax.Array, None]:
    """block(x) under jax.checkpoint: a functional copy of the block, so nothing writes back across traces."""
    graphdef, state = nnx.split(block)

    def run(state, x):
        return nnx.merge(graphdef, state)(x, cache=None, **inputs)

    return jax.checkpoint(run, policy=policy)(state, x)
