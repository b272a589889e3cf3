"""Similarity top-k over a device mesh: queries split over the data axes, keys over the model axes.

Each device searches its key shard for its query rows; key ids are global
from the start (the id array is sharded with the keys), so the local
candidates need no offsetting. The k candidates of every key shard are
all-gathered along the model axes and merged into the global top k, so only
n x k x (key shards) candidates ever cross the network.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from emjax.distributed import DEFAULT_RULES, logical_to_spec
from emjax.kernels.topk_merge import PAD_ID, merge_candidates, pad_rows

# Queries follow the batch rule (data x fsdp); keys take the model-parallel axes.
SEARCH_RULES = {"queries": DEFAULT_RULES["batch"], "keys": ("tensor", "expert")}

LocalSearch = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray, int], tuple[jnp.ndarray, jnp.ndarray]]


def _parts(mesh: Mesh, logical: str) -> tuple[tuple[str, ...], int]:
    axes = tuple(a for a in SEARCH_RULES[logical] if mesh.shape[a] > 1)
    return axes, math.prod(mesh.shape[a] for a in axes)


@functools.partial(jax.jit, static_argnames=("k", "local_search", "mesh"))
def sharded_topk(
    queries: jnp.ndarray, keys: jnp.ndarray, k: int, *, local_search: LocalSearch, mesh: Mesh
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Global (values [n,k], key ids [n,k]) with the work spread over `mesh`.

    Rows are zero-padded up to a multiple of the shard counts; padded keys get
    id PAD_ID and are masked inside the local search, so they are never chosen.
    """
    n, m = queries.shape[0], keys.shape[0]
    _, query_parts = _parts(mesh, "queries")
    key_axes, key_parts = _parts(mesh, "keys")
    n_pad = -(-n // query_parts) * query_parts
    m_pad = -(-m // key_parts) * key_parts
    q = pad_rows(queries, n_pad)
    kk = pad_rows(keys, m_pad)
    ids = jnp.where(jnp.arange(m_pad) < m, jnp.arange(m_pad), PAD_ID).astype(jnp.int32)

    q_spec = logical_to_spec(("queries", None), q.shape, mesh, SEARCH_RULES, what="queries")
    k_spec = logical_to_spec(("keys", None), kk.shape, mesh, SEARCH_RULES, what="keys")
    ids_spec = PartitionSpec(k_spec[0])

    def search_shard(q, kk, ids):
        values, found = local_search(q, kk, ids, k)
        if not key_axes:
            return values, found
        values = jax.lax.all_gather(values, key_axes, axis=1, tiled=True)
        found = jax.lax.all_gather(found, key_axes, axis=1, tiled=True)
        return merge_candidates(values, found, k)

    values, found = jax.shard_map(
        search_shard,
        mesh=mesh,
        in_specs=(q_spec, k_spec, ids_spec),
        out_specs=(PartitionSpec(q_spec[0], None), PartitionSpec(q_spec[0], None)),
        # The merged result is identical on every key shard, but all_gather
        # output is typed as varying, so the replication check cannot see it.
        check_vma=False,
    )(q, kk, ids)
    return values[:n], found[:n]
