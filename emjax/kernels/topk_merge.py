"""Exact top-k bookkeeping shared by the similarity paths.

Every path works on (value, key id) candidate pairs under one total order:
value descending, then key id ascending. Padding and masked keys carry the
value -inf and the id -1, so they sort after every real candidate.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

PAD_ID = -1


def merge_candidates(values: jnp.ndarray, ids: jnp.ndarray, k: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Best k of unordered candidates [..., c] by (value desc, id asc), sorted.

    Used where candidates arrive in no particular id order (kernel outputs,
    shards): a two-key sort makes the tie rule hold whatever the arrival order.
    """
    neg, ids = lax.sort((-values, ids), dimension=values.ndim - 1, num_keys=2)
    return -neg[..., :k], ids[..., :k]


def normalize_rows(x: jnp.ndarray) -> jnp.ndarray:
    """Rows scaled to unit L2 norm in fp32, returned in x's dtype.

    Zero rows stay zero (their cosine with anything is defined as 0), which is
    why the norm is guarded instead of divided by directly.
    """
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True))
    return jnp.where(norm > 0, x32 / jnp.where(norm > 0, norm, 1.0), 0.0).astype(x.dtype)


def pad_rows(x: jnp.ndarray, rows: int) -> jnp.ndarray:
    """x with zero rows appended up to `rows` rows."""
    return jnp.pad(x, ((0, rows - x.shape[0]), (0, 0))) if rows > x.shape[0] else x
