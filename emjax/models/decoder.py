"""The decoder-only language model every family shares: embed, blocks, final norm, head.

A family subclasses `DecoderLM`, passes its block and norm to the shared
constructor (which makes `embed`, `blocks`, `final_norm` and `head` when
untied), and overrides the two hooks where it differs: `scale_embeddings` (Gemma multiplies by sqrt(d_model)) and
`cap_logits` (Gemma-2 soft-caps the final logits).

The blocks are scanned, not unrolled (`LayerStack`): layer i's weights live at
`blocks.layers[i % period]`, index i // period of a leading layer-group axis,
where `period` is the repeat of the attention pattern (Gemma-2 and gpt-oss
alternate local and global layers: 2; Llama: 1). One `jax.lax.scan` over the
groups runs `period` blocks per step, so the traced and compiled program, and
its compile time, do not grow with depth; the residuals a remat policy keeps
are stacked per group by the scan.

The forward can also ablate directions from the residual stream (concept
ablation during fine-tuning, emjax.ablation): `ablate={layer: Q}` with Q
[k, d_model] orthonormal rows replaces the residual after block `layer` by
h - (h Q^T) Q before anything downstream (or `capture`) sees it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emjax import distributed
from emjax.models import layers
from emjax.models.layers import F32
from emjax.precision import matmul_precision


@flax.struct.dataclass
class Output:
    logits: jax.Array | None  # [B, T, V] fp32, None when stopped early (or head=False)
    captured: dict[int, jax.Array]  # layer -> residual stream after that block (and its ablation), [B, T, D]
    cache: layers.KVCache | None
    hidden: jax.Array | None = None  # [B, T, D] the head's input (after the final norm), with head=False


def layer_period(cfg) -> int:
    """The fewest layers after which the attention windows repeat and that divides num_layers
    (2 for Gemma-2's and gpt-oss's local/global pairs, 1 for Llama; num_layers if there is none)."""
    n = cfg.num_layers
    windows = [cfg.window(i) for i in range(n)]
    return next(p for p in range(1, n + 1) if n % p == 0 and all(windows[i] == windows[i % p] for i in range(n)))


def stack_modules(modules: Sequence[nnx.Module]) -> nnx.Module:
    """One module like modules[0] whose every variable gains a leading axis over `modules` (logical axis "layers")."""
    graphdef, first = nnx.split(modules[0])
    states = [first]
    for m in modules[1:]:
        g, s = nnx.split(m)
        if g != graphdef:
            raise ValueError(f"cannot stack {type(m).__name__} modules of different structure")
        states.append(s)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    for _, var in nnx.to_flat_state(stacked):
        axes = var.get_metadata().get("logical_axes")
        if axes is not None:
            var.set_metadata(logical_axes=("layers", *axes))
    return nnx.merge(graphdef, stacked)


class LayerStack(nnx.Module):
    """num_layers blocks as `period` stacked modules, scanned over num_layers / period groups.

    Why stacked weights rather than per-layer modules stacked inside the jitted
    step: a jnp.stack of per-layer weights in the step would copy every weight
    on every call (one more copy of the model in memory, and twice the weight
    traffic of each decode step, which is bandwidth-bound); stored stacked,
    the scan reads each group's slice in place. Checkpoints, PEFT adapters and
    captures stay per layer (see emjax.models.checkpoint, emjax.lora).
    """

    def __init__(self, blocks: Sequence[nnx.Module], period: int):
        if len(blocks) % period:
            raise ValueError(f"{len(blocks)} layers are not a whole number of groups of {period}")
        self.period = period
        self.num_groups = len(blocks) // period
        self.layers = nnx.List([stack_modules(blocks[j::period]) for j in range(period)])

    def __len__(self) -> int:
        return self.period * self.num_groups

    def locate(self, layer: int) -> tuple[int, int]:
        """(position in the group = index into `layers`, group = index along the layer axis) of layer `layer`."""
        if not 0 <= layer < len(self):
            raise IndexError(f"layer {layer} is outside 0..{len(self) - 1}")
        return layer % self.period, layer // self.period

    def __getitem__(self, layer: int) -> nnx.Module:
        """Layer `layer` as a module of its own: a read-only copy of its slice of the stacked weights."""
        position, group = self.locate(layer)
        graphdef, state = nnx.split(self.layers[position])
        return nnx.merge(graphdef, jax.tree.map(lambda a: a[group], state))

    def __call__(
        self,
        x: jax.Array,
        inputs: dict,
        *,
        stop: int,
        capture: Sequence[int],
        ablate: Mapping[int, jax.Array],
        caches: tuple[layers.LayerCache, ...] | None,
        remat,
        shard: layers.Sharder,
    ):
        """Blocks 0..stop-1 over x: (x, {layer: residual} for `capture`, the updated caches or None).

        Whole groups run in one scan; the blocks of a group that `stop` cuts run after it, unscanned.
        The captured residuals are written into a buffer carried by the scan (one slot per captured
        layer and a spare slot that every other layer overwrites); ablations apply where the traced
        layer index matches, so both are exact copies of what an unrolled loop computes.
        """
        p = self.period
        parts = [nnx.split(m) for m in self.layers]
        graphdefs, states = [g for g, _ in parts], tuple(s for _, s in parts)
        groups = stop // p
        slots = sorted(set(capture))
        slot_of = np.full(len(self), len(slots), np.int32)
        slot_of[slots] = np.arange(len(slots), dtype=np.int32)
        slot_of = jnp.asarray(slot_of)
        captured: dict[int, jax.Array] = {}

        def run(j, state, i, x, buffer, layer_cache, in_scan):
            if remat is None:
                x, layer_cache = nnx.merge(graphdefs[j], state)(x, cache=layer_cache, **inputs)
            else:
                x, layer_cache = _checkpointed(graphdefs[j], state, x, inputs, remat, prevent_cse=not in_scan)
            x = shard(x, "batch", None, None)
            for layer, basis in ablate.items():
                if in_scan:
                    x = jnp.where(i == layer, shard(project_out(x, basis), "batch", None, None), x)
                elif i == layer:
                    x = shard(project_out(x, basis), "batch", None, None)
            if in_scan and buffer is not None:
                buffer = jax.lax.dynamic_update_index_in_dim(buffer, x, slot_of[i], 0)
            elif i in slots:
                captured[i] = x
            return x, buffer, layer_cache

        def body(carry, xs):
            x, buffer, caches = carry
            group, group_states = xs
            if group_states is None:  # stopped early: index the weights in place rather than slice a copy
                group_states = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, group, 0, False), states)
            new_caches = []
            for j in range(p):
                layer_cache = None if caches is None else _cache_at(caches[j], group)
                x, buffer, layer_cache = run(j, group_states[j], group * p + j, x, buffer, layer_cache, True)
                if caches is not None:
                    new_caches.append(_cache_with(caches[j], layer_cache, group, shard))
            return (x, buffer, None if caches is None else tuple(new_caches)), None

        if groups:
            buffer = jnp.zeros((len(slots) + 1, *x.shape), x.dtype) if slots else None
            xs = (jnp.arange(groups), states if groups == self.num_groups else None)
            (x, buffer, caches), _ = jax.lax.scan(body, (x, buffer, caches), xs)
            for layer in slots:
                if layer < groups * p:
                    captured[layer] = buffer[slot_of[layer]]
        for j in range(stop - groups * p):  # only when stopping early, so without a cache
            state = jax.tree.map(lambda a: a[groups], states[j])
            x, _, _ = run(j, state, groups * p + j, x, None, None, False)
        return x, captured, caches


def _cache_at(cache: layers.LayerCache, group) -> layers.LayerCache:
    """One layer's cache out of a stacked one ([B, layer groups, ...])."""
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, group, 1, False), cache)


def _cache_with(stacked: layers.LayerCache, cache: layers.LayerCache, group, shard) -> layers.LayerCache:
    updated = jax.tree.map(lambda s, c: jax.lax.dynamic_update_index_in_dim(s, c, group, 1), stacked, cache)
    return layers.shard_layer_cache(updated, shard)


class DecoderLM(nnx.Module):
    """model(tokens, attention_mask=, capture=, stop_at_layer=, cache=, segment_ids=, remat=, ablate=, head=) -> Output.

    segment_ids [B, T] marks packed examples (0 is padding): attention stays
    inside each example and rotary positions restart at each. remat, a
    jax.checkpoint policy, recomputes each block's activations in the backward
    pass instead of storing them, but for those the policy saves (training).
    ablate {layer: Q [k, d_model]}, Q with orthonormal rows
    (emjax.ablation.orthonormal_basis), projects the span of Q out of the
    residual stream after block `layer`; the captured residual at that layer is
    the ablated one. None (default) is the plain forward. head=False skips the
    output head: `hidden` holds its input (the final norm's output) and
    `logits` is None, for a loss that applies the head in chunks (emjax.train).

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
        untied, created in this order (it fixes what a seeded init draws); the blocks are then stacked."""
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.embed = layers.param(
            rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype, fan_in=cfg.hidden_size
        )
        self.blocks = LayerStack([block(i) for i in range(cfg.num_layers)], layer_period(cfg))
        self.final_norm = norm()
        if not cfg.tie_word_embeddings:
            self.head = layers.param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dtype)
        self.shard = sharder

    def scale_embeddings(self, x: jax.Array) -> jax.Array:
        return x

    def cap_logits(self, logits: jax.Array) -> jax.Array:
        return logits

    def head_logits(self, hidden: jax.Array) -> jax.Array:
        """Soft-capped fp32 logits [..., V] of the final norm's output `hidden` [..., D]."""
        head = self.embed[...].T if self.config.tie_word_embeddings else self.head[...]
        precision = matmul_precision(hidden.dtype, head.dtype)
        logits = jnp.einsum("...d,dv->...v", hidden, head, preferred_element_type=jnp.float32, precision=precision)
        return self.cap_logits(logits)

    def init_cache(self, batch: int, max_len: int) -> layers.KVCache:
        """An empty cache for `max_len` tokens (prompt, padding and generated tokens together).

        Its `layers` hold one stacked cache per position in a layer group ([B, groups, slots, ...]):
        a sliding-window position keeps a ring of `window` slots, a global one `max_len`.
        """
        cfg, stack = self.config, self.blocks
        caches = []
        for j in range(stack.period):
            window = cfg.window(j)
            slots = max_len if window is None else min(window, max_len)
            caches.append(
                layers.init_layer_cache(
                    batch, slots, cfg.num_kv_heads, cfg.head_dim, self.dtype, self.shard, groups=stack.num_groups
                )
            )
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
        head: bool = True,
    ) -> Output:
        options = dict(capture=tuple(capture), stop_at_layer=stop_at_layer, remat=remat, head=head)
        arrays = dict(attention_mask=attention_mask, cache=cache, segment_ids=segment_ids, ablate=ablate)
        graphdef, state = nnx.split(self)
        if _concrete((tokens, arrays, state)):
            # Called eagerly: run the forward as one cached jitted program. Op by op, the layer
            # scan would be traced and compiled again on every call.
            tokens, arrays = distributed.on_auto_mesh((tokens, arrays))
            return _jitted_forward(graphdef, tuple(sorted(options.items())), state, tokens, arrays)
        return self.forward(tokens, **options, **arrays)

    def forward(
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
        head: bool = True,
    ) -> Output:
        """The forward as traced code (what __call__ runs, or jits when called eagerly)."""
        cfg = self.config
        batch, length = tokens.shape
        stop = cfg.num_layers if stop_at_layer is None else int(stop_at_layer)
        if not 0 < stop <= cfg.num_layers:
            raise ValueError(f"stop_at_layer={stop_at_layer} must be in 1..{cfg.num_layers}")
        capture = tuple(int(layer) for layer in capture)
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
        inputs = dict(positions=positions, q_index=q_index, new_index=new_index, start=start)
        if segment_ids is not None:
            inputs["segments"] = segment_ids
        x, captured, new_layers = self.blocks(
            x, inputs, stop=stop, capture=capture, ablate=ablate, remat=remat, shard=self.shard,
            caches=None if cache is None else cache.layers,
        )  # fmt: skip
        if stop < cfg.num_layers:
            return Output(logits=None, captured=captured, cache=None)

        x = self.final_norm(x)
        new_cache = None
        if cache is not None:
            new_cache = layers.KVCache(
                layers=new_layers,
                length=start + length,
                next_position=cache.next_position + jnp.sum(attention_mask > 0, axis=1).astype(jnp.int32),
                max_len=cache.max_len,
            )
        if not head:
            return Output(logits=None, captured=captured, cache=new_cache, hidden=x)
        logits = self.head_logits(x)
        if cache is not None:
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


def _concrete(tree) -> bool:
    """True when nothing in `tree` is being traced (an eager call)."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _jitted_forward(graphdef, options: tuple, state, tokens, arrays) -> Output:
    return nnx.merge(graphdef, state).forward(tokens, **dict(options), **arrays)


def project_out(x: jax.Array, basis: jax.Array) -> jax.Array:
    """x - (x Q^T) Q for Q = basis [k, D] with orthonormal rows, computed in fp32, cast back to x's dtype."""
    q = basis.astype(F32)
    x32 = x.astype(F32)
    coefficients = jnp.einsum("...d,kd->...k", x32, q, precision=matmul_precision(F32))
    return (x32 - jnp.einsum("...k,kd->...d", coefficients, q, precision=matmul_precision(F32))).astype(x.dtype)


def _checkpointed(graphdef, state, x: jax.Array, inputs: dict, policy, *, prevent_cse: bool) -> tuple[jax.Array, None]:
    """A block (graphdef + state) over x under jax.checkpoint: a functional copy, so nothing writes back
    across traces. Inside a scan, CSE cannot merge the recomputation with the forward, so it need not be
    prevented (as jax.checkpoint's documentation advises for scans)."""

    def run(state, x):
        return nnx.merge(graphdef, state)(x, cache=None, **inputs)

    return jax.checkpoint(run, policy=policy, prevent_cse=prevent_cse)(state, x)
