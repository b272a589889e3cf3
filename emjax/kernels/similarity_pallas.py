"""Fused similarity top-k as a Pallas kernel: similarities never leave the chip.

Grid (query block i, key split s, key block j). Program (i, s, j) computes the
fp32 tile queries[i] . keys[s, j]^T on the matrix units and merges it into a
running top-k for its query rows, held in the output block, which stays
resident while j (innermost, sequential) walks the split's key blocks. Splits
run in parallel; their k candidates per row are merged afterwards in XLA.

No Pallas backend lowers sort or top_k, so the running set is kept unsorted
and updated by selection: while some row's best remaining tile value beats its
current worst kept value, extract that tile maximum (max, then the lowest
column among equals via iota/where/min) and overwrite the worst kept entry
(where/select). Tiles that cannot improve any row cost one max-compare, and
after the first few tiles almost none can, so selection costs far less than
the matmul. The loop runs at most block_keys times per tile.

Lowering: TPU through Mosaic (dimension semantics parallel/parallel/arbitrary);
NVIDIA GPUs through Triton, selected explicitly with Triton compiler params,
because in jax 0.10 a plain pallas_call otherwise goes to Mosaic GPU, which
wants warpgroup-level kernels (plgpu.kernel) rather than this portable body.
On CPU the kernel runs with interpret=True (tests); CPU users get the XLA path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from emjax.kernels.similarity_xla import matmul_precision
from emjax.kernels.topk_merge import PAD_ID, merge_candidates, pad_rows


def _selection_kernel(key_ids_ref, q_ref, k_ref, values_ref, ids_ref, *, block_depth: int):
    block_q, depth = q_ref.shape
    block_k = k_ref.shape[0]
    lanes = values_ref.shape[-1]

    @pl.when(pl.program_id(2) == 0)
    def _start_split():
        values_ref[...] = jnp.full(values_ref.shape, -jnp.inf, jnp.float32)
        ids_ref[...] = jnp.full(ids_ref.shape, PAD_ID, jnp.int32)

    precision = matmul_precision(q_ref.dtype)

    def accumulate(c, acc):
        cols = pl.ds(pl.multiple_of(c * block_depth, block_depth), block_depth)
        return acc + lax.dot_general(
            q_ref[:, cols],
            k_ref[:, cols],
            (((1,), (1,)), ((), ())),
            precision=precision,
            preferred_element_type=jnp.float32,
        )

    tile = lax.fori_loop(0, depth // block_depth, accumulate, jnp.zeros((block_q, block_k), jnp.float32))
    tile_ids = key_ids_ref[...]  # [1, block_k], ascending; PAD_ID = masked
    tile = jnp.where(tile_ids >= 0, tile, -jnp.inf)
    column = lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
    lane = lax.broadcasted_iota(jnp.int32, (block_q, lanes), 1)

    def worst_kept(values):
        return jnp.min(values, axis=1, keepdims=True)

    def some_row_improves(state):
        tile, values, _ = state
        improves = jnp.max(tile, axis=1, keepdims=True) > worst_kept(values)
        # A max over int32 rather than jnp.any: Triton has no lowering for reduce_or.
        return jnp.max(improves.astype(jnp.int32)) > 0

    def take_best(state):
        tile, values, ids = state
        best = jnp.max(tile, axis=1, keepdims=True)
        # Lowest column among equal maxima: ids ascend with columns, so this is the tie rule.
        best_col = jnp.min(jnp.where(tile == best, column, block_k), axis=1, keepdims=True)
        best_id = jnp.max(jnp.where(column == best_col, tile_ids, PAD_ID), axis=1, keepdims=True)
        # Evict the worst kept entry: lowest value, and among those the highest id.
        worst = worst_kept(values)
        is_worst = values == worst
        worst_id = jnp.max(jnp.where(is_worst, ids, PAD_ID - 1), axis=1, keepdims=True)
        slot = jnp.min(jnp.where(is_worst & (ids == worst_id), lane, lanes), axis=1, keepdims=True)
        # Strictly greater: every tile id exceeds every kept id of this split, so a tie keeps the kept one.
        replace = (lane == slot) & (best > worst)
        values = jnp.where(replace, best, values)
        ids = jnp.where(replace, best_id, ids)
        tile = jnp.where(column == best_col, -jnp.inf, tile)
        return tile, values, ids

    _, values, ids = lax.while_loop(some_row_improves, take_best, (tile, values_ref[...], ids_ref[...]))
    values_ref[...] = values
    ids_ref[...] = ids


def _compiler_params(platform: str):
    if platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
    if platform in ("gpu", "cuda"):
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=8, num_stages=2)
    return None


@functools.partial(
    jax.jit,
    static_argnames=("k", "block_queries", "block_keys", "block_depth", "key_splits", "interpret", "platform"),
)
def topk_pallas(
    queries: jnp.ndarray,
    keys: jnp.ndarray,
    key_ids: jnp.ndarray,
    k: int,
    *,
    block_queries: int = 128,
    block_keys: int = 128,
    block_depth: int = 128,
    key_splits: int = 1,
    interpret: bool = False,
    platform: str | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Same contract as similarity_xla.topk_blocked, computed by the fused kernel.

    Block sizes must be powers of two (Triton) and, on TPU, multiples of 128
    in the key and depth dimensions; queries and keys are zero-padded to whole
    blocks (padded keys are masked by id, zero depth adds nothing).
    platform ("tpu", "cuda"; default: this process's backend) picks the
    compiler parameters, so a CPU host can lower the kernel for accelerators.
    """
    n, d = queries.shape
    m = keys.shape[0]
    for name, size in (("block_queries", block_queries), ("block_keys", block_keys), ("block_depth", block_depth)):
        if size <= 0 or size & (size - 1):
            raise ValueError(f"{name} must be a positive power of two, got {size}")
    if key_splits <= 0:
        raise ValueError(f"key_splits must be positive, got {key_splits}")
    lanes = pl.next_power_of_2(k)  # the running set keeps >= k entries; extras only add candidates
    depth = -(-d // block_depth) * block_depth
    n_pad = -(-n // block_queries) * block_queries
    blocks_per_split = -(-m // (block_keys * key_splits))
    m_pad = blocks_per_split * block_keys * key_splits

    q = jnp.pad(pad_rows(queries, n_pad), ((0, 0), (0, depth - d)))
    kk = jnp.pad(pad_rows(keys, m_pad), ((0, 0), (0, depth - d)))
    ids = jnp.pad(key_ids.astype(jnp.int32), (0, m_pad - m), constant_values=PAD_ID)[None, :]

    def key_block(i, s, j):
        return s * blocks_per_split + j

    kernel = functools.partial(_selection_kernel, block_depth=block_depth)
    out_block = pl.BlockSpec((pl.squeezed, block_queries, lanes), lambda i, s, j: (s, i, 0))
    values, cand_ids = pl.pallas_call(
        kernel,
        grid=(n_pad // block_queries, key_splits, blocks_per_split),
        in_specs=[
            pl.BlockSpec((1, block_keys), lambda i, s, j: (0, key_block(i, s, j))),
            pl.BlockSpec((block_queries, depth), lambda i, s, j: (i, 0)),
            pl.BlockSpec((block_keys, depth), lambda i, s, j: (key_block(i, s, j), 0)),
        ],
        out_specs=[out_block, out_block],
        out_shape=[
            jax.ShapeDtypeStruct((key_splits, n_pad, lanes), jnp.float32),
            jax.ShapeDtypeStruct((key_splits, n_pad, lanes), jnp.int32),
        ],
        compiler_params=None if interpret else _compiler_params(platform or jax.default_backend()),
        interpret=interpret,
    )(ids, q, kk)
    # [splits, n, lanes] -> [n, splits * lanes] unordered candidates -> sorted top k.
    values = jnp.moveaxis(values[:, :n], 0, 1).reshape(n, key_splits * lanes)
    cand_ids = jnp.moveaxis(cand_ids[:, :n], 0, 1).reshape(n, key_splits * lanes)
    return merge_candidates(values, cand_ids, k)
