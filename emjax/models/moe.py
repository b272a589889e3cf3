"""Mixture-of-experts execution: exact top-k routing, tokens grouped by expert, grouped matmuls.

The fast path sorts the (token, expert) assignments by expert and runs each
expert's rows as one `jax.lax.ragged_dot`. Under a mesh it runs inside
`jax.shard_map`: each device holds the experts of its `expert` shard (and its
`tensor` slice of their hidden dimension), processes every assignment that
falls on them, and the partial outputs are summed over those axes. No
capacity limit, so no token is ever dropped: results equal the dense
reference (`dense_experts`), which runs every expert on every token.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from emjax import distributed
from emjax.precision import matmul_precision

F32 = jnp.float32


def route(x: jax.Array, weight: jax.Array, bias: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
    """gpt-oss routing: the top-k router logits, softmaxed over those k. x [N, D] -> ([N, k] ids, [N, k] weights)."""
    precision = matmul_precision(x.dtype, weight.dtype)
    logits = jnp.einsum("nd,de->ne", x, weight, preferred_element_type=F32, precision=precision) + bias.astype(F32)
    top_logits, experts = jax.lax.top_k(logits, top_k)
    return experts, jax.nn.softmax(top_logits, axis=-1)


def grouped_experts(x, experts, weights, gate_up, gate_up_bias, down, activation: Callable, expert_offset=0):
    """Sum over each token's experts held here of weight * down(activation(gate_up(x))), without down's bias.

    x [N, D]; experts, weights [N, k]; gate_up [E, D, F, 2]; gate_up_bias [E, F, 2]; down [E, F, D],
    where E counts the experts held here, numbered from `expert_offset`.
    """
    n, k = experts.shape
    e, d, f, _ = gate_up.shape
    local = experts.reshape(-1) - expert_offset
    held = (local >= 0) & (local < e)
    group = jnp.where(held, local, e)  # assignments to other devices' experts sort last
    order = jnp.argsort(group, stable=True)
    sizes = jnp.bincount(group, length=e + 1)[:e]
    token = order // k
    group = jnp.minimum(group[order], e - 1)
    precision = matmul_precision(x.dtype, gate_up.dtype)
    h = jax.lax.ragged_dot(
        x[token], gate_up.reshape(e, d, 2 * f), sizes, precision=precision, preferred_element_type=F32
    )
    h = h.reshape(-1, f, 2) + gate_up_bias[group].astype(F32)
    y = jax.lax.ragged_dot(activation(h).astype(x.dtype), down, sizes, precision=precision, preferred_element_type=F32)
    y = y * jnp.where(held[order], weights.reshape(-1)[order], 0.0)[:, None]
    return jnp.zeros((n, d), F32).at[token].add(y)


def dense_experts(x, experts, weights, gate_up, gate_up_bias, down, activation: Callable):
    """The reference: every expert on every token, combined with the routing weights."""
    precision = matmul_precision(x.dtype, gate_up.dtype)
    h = jnp.einsum("nd,edfc->nefc", x, gate_up, preferred_element_type=F32, precision=precision)
    h = h + gate_up_bias.astype(F32)
    y = jnp.einsum("nef,efd->ned", activation(h).astype(x.dtype), down, preferred_element_type=F32, precision=precision)
    exact = matmul_precision(F32)  # the combination runs in fp32 whatever the model's dtype
    combine = jnp.einsum("nk,nke->ne", weights.astype(F32), jax.nn.one_hot(experts, gate_up.shape[0], dtype=F32),
                         precision=exact)  # fmt: skip
    return jnp.einsum("ne,ned->nd", combine, y, precision=exact)


def down_bias_term(experts, weights, down_bias):
    """sum_k weight_k * down_bias[expert_k], added once outside any sharded partial sums."""
    one_hot = jax.nn.one_hot(experts, down_bias.shape[0], dtype=F32)
    weights, down_bias = weights.astype(F32), down_bias.astype(F32)
    return jnp.einsum("nk,nke,ed->nd", weights, one_hot, down_bias, precision=matmul_precision(F32))


def sharded_grouped_experts(mesh, rules, x, experts, weights, gate_up, gate_up_bias, down, activation):
    """grouped_experts under shard_map: tokens split over the batch axes, experts over `experts`'
    mesh axes, the expert hidden dimension over `mlp`'s; partial sums reduced over the last two."""
    rules = distributed.DEFAULT_RULES if rules is None else rules

    def axes(logical):
        found = tuple(a for a in rules[logical] if mesh.shape[a] > 1)
        return found or None

    batch, expert, mlp = axes("batch"), axes("experts"), axes("mlp")
    reduce_over = tuple(a for a in (expert or ()) + (mlp or ()))
    experts_per_shard = gate_up.shape[0] // math.prod(mesh.shape[a] for a in expert or ())

    def local(x, experts, weights, gate_up, gate_up_bias, down):
        offset = 0
        if expert:
            index = 0
            for a in expert:  # row-major position of this device along the expert axes
                index = index * mesh.shape[a] + jax.lax.axis_index(a)
            offset = index * experts_per_shard
        out = grouped_experts(x, experts, weights, gate_up, gate_up_bias, down, activation, offset)
        return jax.lax.psum(out, reduce_over) if reduce_over else out

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(
            P(batch, None),
            P(batch, None),
            P(batch, None),
            P(expert, None, mlp, None),
            P(expert, mlp, None),
            P(expert, mlp, None),
        ),
        out_specs=P(batch, None),
    )(x, experts, weights, gate_up, gate_up_bias, down)
