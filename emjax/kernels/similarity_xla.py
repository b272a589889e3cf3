"""Blocked XLA top-k similarity: the CPU default and the fallback everywhere.

Queries are processed in blocks (lax.map) and, for each, keys stream past in
blocks (lax.scan); each [block_queries, block_keys] similarity tile is merged
into a running top-k with lax.top_k and then dropped, so memory stays
O(block_queries * (block_keys + k)) however many keys there are.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from emjax.kernels.topk_merge import PAD_ID, pad_rows
from emjax.precision import matmul_precision


def tile_similarity(q: jnp.ndarray, keys: jnp.ndarray) -> jnp.ndarray:
    """q [a,d] . keys [b,d]^T with fp32 accumulation -> [a,b] fp32 (fp32 inputs: fp32 products, emjax.precision)."""
    return lax.dot_general(
        q,
        keys,
        (((1,), (1,)), ((), ())),
        precision=matmul_precision(q.dtype, keys.dtype),
        preferred_element_type=jnp.float32,
    )


@functools.partial(jax.jit, static_argnames=("k", "block_queries", "block_keys"))
def topk_blocked(
    queries: jnp.ndarray,
    keys: jnp.ndarray,
    key_ids: jnp.ndarray,
    k: int,
    *,
    block_queries: int = 2048,
    block_keys: int = 2048,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Top-k of queries [n,d] . keys [m,d]^T, returning (values fp32 [n,k], key ids [n,k]).

    key_ids [m] int32 names each key in the output; PAD_ID masks a key out.
    Valid ids must ascend with the row position: a stable top_k over
    [running, tile] then breaks value ties by the lower id. Rows with fewer
    than k valid keys are filled with (-inf, PAD_ID).
    """
    n, d = queries.shape
    m = keys.shape[0]
    bq = min(block_queries, n)
    bk = min(block_keys, m)
    n_pad = -(-n // bq) * bq
    m_pad = -(-m // bk) * bk
    q_blocks = pad_rows(queries, n_pad).reshape(n_pad // bq, bq, d)
    k_blocks = pad_rows(keys, m_pad).reshape(m_pad // bk, bk, d)
    id_blocks = jnp.pad(key_ids.astype(jnp.int32), (0, m_pad - m), constant_values=PAD_ID).reshape(m_pad // bk, bk)

    def one_query_block(q):
        def merge_tile(running, block):
            run_values, run_ids = running
            tile_keys, tile_ids = block
            tile = jnp.where(tile_ids[None, :] >= 0, tile_similarity(q, tile_keys), -jnp.inf)
            values = jnp.concatenate([run_values, tile], axis=1)
            ids = jnp.concatenate([run_ids, jnp.broadcast_to(tile_ids, tile.shape)], axis=1)
            top_values, where = lax.top_k(values, k)
            return (top_values, jnp.take_along_axis(ids, where, axis=1)), None

        init = (jnp.full((bq, k), -jnp.inf, jnp.float32), jnp.full((bq, k), PAD_ID, jnp.int32))
        (values, ids), _ = lax.scan(merge_tile, init, (k_blocks, id_blocks))
        return values, ids

    values, ids = lax.map(one_query_block, q_blocks)
    return values.reshape(n_pad, k)[:n], ids.reshape(n_pad, k)[:n]
