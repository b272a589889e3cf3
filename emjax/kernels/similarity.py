"""Exact top-k cosine (or dot-product) similarity search, fused so the n x m matrix is never stored.

    values, indices = similarity_topk(queries, keys, k)

Semantics shared by every path (Pallas kernel, blocked XLA, sharded):
- values [n,k] fp32 sorted descending; indices [n,k] int32 rows of `keys`;
  equal values are ordered by the lower key index.
- normalize=True gives cosine similarity; rows are normalised in fp32 and
  the products run in the input dtype (bf16 or fp32) with fp32 accumulation,
  fp32 products at HIGHEST precision on every backend (emjax.precision).
- Zero vectors: a zero query or key has cosine 0 with everything (it is not
  NaN), so a zero query returns values 0 and indices 0..k-1 by the tie rule.
- NaN or infinite inputs give undefined results.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from emjax import distributed
from emjax.kernels.sharded import sharded_topk
from emjax.kernels.similarity_pallas import topk_pallas
from emjax.kernels.similarity_xla import topk_blocked
from emjax.kernels.topk_merge import normalize_rows

METHODS = ("auto", "xla", "pallas")

# Backends (jax.default_backend() names) on which the fused Pallas kernel has passed the
# accelerator suite (`EMJAX_TEST_PLATFORM=<backend> python -m pytest -m accelerator` on that
# hardware), each with the run that showed it. method="auto" uses the kernel only on these and
# the blocked XLA path everywhere else: a kernel that is right in the CPU interpreter can still
# be wrong on a device (the first GPU run found wrong neighbours). Add an entry only with a
# passing run recorded in benchmarks/RESULTS.md.
VALIDATED_KERNEL_BACKENDS: dict[str, str] = {}


def resolve_method(method: str, backend: str | None = None) -> str:
    """The path `method` means on `backend` (default: this process's): "xla" or "pallas"."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "auto":
        return "pallas" if (backend or jax.default_backend()) in VALIDATED_KERNEL_BACKENDS else "xla"
    return method


def _check_inputs(queries, keys, k: int) -> None:
    if queries.ndim != 2 or keys.ndim != 2:
        raise ValueError(f"queries and keys must be 2-D [n,d] and [m,d], got {queries.shape} and {keys.shape}")
    if queries.shape[1] != keys.shape[1]:
        raise ValueError(
            f"queries {queries.shape} and keys {keys.shape} have different feature sizes "
            f"({queries.shape[1]} != {keys.shape[1]})"
        )
    for name, x in (("queries", queries), ("keys", keys)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > keys.shape[0]:
        raise ValueError(f"k={k} exceeds the number of keys m={keys.shape[0]} (keys {keys.shape})")


def _local_search(method: str, interpret: bool | None, block_queries: int | None, block_keys: int | None):
    """The single-device search (q, keys, key_ids, k) -> (values, ids) for a method."""
    backend = jax.default_backend()
    if resolve_method(method, backend) == "xla":
        sizes = {"block_queries": block_queries or 2048, "block_keys": block_keys or 2048}
        return functools.partial(topk_blocked, **sizes)
    # CPU has no Pallas lowering: there the kernel can only be interpreted.
    interpret = backend == "cpu" if interpret is None else interpret
    return functools.partial(topk_pallas, interpret=interpret, block_queries=block_queries, block_keys=block_keys)


def similarity_topk(
    queries,
    keys,
    k: int,
    *,
    normalize: bool = True,
    method: str = "auto",
    mesh: Mesh | None = None,
    interpret: bool | None = None,
    block_queries: int | None = None,
    block_keys: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Exact top-k similarity of each query [n,d] against keys [m,d] -> (values [n,k], indices [n,k]).

    method: "pallas" (the fused kernel; interpreted on CPU), "xla" (blocked
    scan), or "auto": the kernel on the backends in VALIDATED_KERNEL_BACKENDS,
    the XLA path elsewhere.
    mesh: a (data, fsdp, tensor, expert) mesh; queries are split over the
    data axes and keys over tensor x expert, and candidates merged globally.
    """
    queries, keys = jnp.asarray(queries), jnp.asarray(keys)
    _check_inputs(queries, keys, k)
    dtype = jnp.result_type(queries.dtype, keys.dtype)
    queries, keys = queries.astype(dtype), keys.astype(dtype)
    if queries.shape[0] == 0:
        return jnp.zeros((0, k), jnp.float32), jnp.zeros((0, k), jnp.int32)
    if normalize:
        queries, keys = normalize_rows(queries), normalize_rows(keys)
    search = _local_search(method, interpret, block_queries, block_keys)
    if mesh is not None:
        return sharded_topk(queries, keys, k, local_search=search, mesh=distributed.auto_mesh(mesh))
    return search(queries, keys, jnp.arange(keys.shape[0], dtype=jnp.int32), k)


def similarity_topk_sets(query_sets: Sequence, keys, k: int, **options) -> list[tuple[jax.Array, jax.Array]]:
    """similarity_topk for several query sets [n_i,d] against one key set, in one search.

    The sets are concatenated so the keys stream past once for all of them;
    returns one (values, indices) pair per set, in order.
    """
    if not query_sets:
        return []
    sizes = [jnp.shape(q)[0] for q in query_sets]
    values, indices = similarity_topk(jnp.concatenate([jnp.asarray(q) for q in query_sets]), keys, k, **options)
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    return [(values[a:b], indices[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def similarity_score(queries, keys, *, k: int = 1, **options) -> jax.Array:
    """Per-query mean of the k highest similarities to `keys` (k=1: the maximum).

    queries may carry leading dimensions, e.g. token activations [B,T,d] -> [B,T],
    for scoring samples against a set of toxic directions.
    """
    queries = jnp.asarray(queries)
    lead = queries.shape[:-1]
    values, _ = similarity_topk(queries.reshape(-1, queries.shape[-1]), keys, k, **options)
    return jnp.mean(values, axis=1).reshape(lead)
