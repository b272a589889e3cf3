"""Counts on a program's jaxpr: matmul FLOPs (loops multiplied out) and the most bytes alive at once.

XLA's cost analysis counts a while loop's body once, so a scanned model's
compiled FLOPs do not grow with depth; these counts walk the jaxpr instead,
multiplying a scan's body by its length. The FLOPs are those of dot_general
and ragged_dot (elementwise work is left out, as MFU conventions do); the peak
models what XLA writes out (no bitcasts, no elementwise chains fused into
their readers) but not its rematerialisation or buffer reuse across loops, so
it leans high.
"""

from __future__ import annotations

import math

import numpy as np
from jax.extend import core


def _nbytes(aval) -> int:
    shape, dtype = getattr(aval, "shape", None), getattr(aval, "dtype", None)
    if shape is None or dtype is None:
        return 0
    try:
        itemsize = np.dtype(dtype).itemsize
    except TypeError:  # PRNG key arrays and other extended dtypes
        itemsize = 8
    return math.prod(shape) * itemsize


def _inner(eqn) -> list:
    """The jaxprs inside an equation (a scan's or jit's body, a cond's branches, a remat's function, ...)."""
    found = []

    def visit(value):
        if isinstance(value, core.ClosedJaxpr):
            found.append(value.jaxpr)
        elif isinstance(value, core.Jaxpr):
            found.append(value)
        elif isinstance(value, (tuple, list)):
            for v in value:
                visit(v)

    for value in eqn.params.values():
        visit(value)
    return found


def _times(eqn) -> int:
    """How often an equation runs its inner jaxpr: a scan's length, else once."""
    return int(eqn.params.get("length", 1)) if eqn.primitive.name == "scan" else 1


def matmul_flops(jaxpr) -> int:
    """2 x multiply-adds of every dot_general and ragged_dot, scan bodies times their length.

    A shard_map body's shapes are per shard: its FLOPs are multiplied by the
    number of shards, so the total is the whole program's over all devices.
    A cond counts its most expensive branch; a while loop's body counts once.
    Matmuls whose results nothing reads are left out, as XLA drops them.
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0
    for eqn in _needed(jaxpr):
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
        elif name.startswith("ragged_dot"):
            lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
            total += 2 * lhs[0] * lhs[1] * rhs[-1]  # [m, k] rows each against one group's [k, n]
        inner = _inner(eqn)
        if not inner:
            continue
        counts = [matmul_flops(j) for j in inner]
        if name == "cond":
            total += max(counts)
        else:
            shards = math.prod(eqn.params["mesh"].shape.values()) if name == "shard_map" else 1
            total += _times(eqn) * shards * sum(counts)
    return total


# Equations whose output XLA lays over their input's buffer (a bitcast); transposes read only by
# matmuls are folded into them likewise.
_ALIASING = {"reshape", "squeeze", "expand_dims"}
# Elementwise equations: XLA fuses one into its readers when they are all elementwise or reductions,
# and the fused value is never written out.
_ELEMENTWISE = {
    "add", "sub", "mul", "div", "max", "min", "neg", "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic",
    "rsqrt", "sqrt", "pow", "integer_pow", "square", "abs", "sign", "erf", "select_n", "convert_element_type",
    "and", "or", "not", "xor", "eq", "ne", "lt", "le", "gt", "ge", "clamp", "broadcast_in_dim", "nextafter",
    "is_finite", "floor", "ceil", "round", "rem", "copy", "sin", "cos", "tan", "atan2", "cbrt",
}  # fmt: skip
_FUSING = _ELEMENTWISE | {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax", "argmin", "reduce_and",
                          "reduce_or"}  # fmt: skip


def peak_live_bytes(jaxpr) -> int:
    """The most bytes of intermediate values alive at once (the jaxpr's own inputs left out).

    Equations whose results nothing reads are dropped, as XLA drops them. A
    value lives from the equation that makes it to its last use (to the end
    for outputs). As XLA compiles it, a reshape shares its input's buffer, a
    transpose read only by matmuls is folded into them, and an elementwise
    value read only by elementwise operations or reductions is fused into them:
    none of these is written out, but what they are computed from stays alive
    until their readers run. An equation with inner jaxprs adds their own peak
    to what is alive around it (and a scan its stacked outputs besides, which
    exist while its body runs).
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    eqns = _needed(jaxpr)
    readers: dict = {}
    for eqn in eqns:
        for v in eqn.invars:
            if isinstance(v, core.Var):
                readers.setdefault(v, []).append(eqn.primitive.name)
    outputs = {v for v in jaxpr.outvars if isinstance(v, core.Var)}
    # Each value -> the written-out values it stands for (itself, unless it is aliased or fused).
    sources: dict = {}
    for eqn in eqns:
        name = eqn.primitive.name
        ins = [v for v in eqn.invars if isinstance(v, core.Var)]
        for v in eqn.outvars:
            read_by = readers.get(v, [])
            folded = name == "transpose" and read_by and all(r == "dot_general" for r in read_by)
            fused = name in _ELEMENTWISE and read_by and all(r in _FUSING for r in read_by) and v not in outputs
            if ins and (name in _ALIASING or folded or fused):
                sources[v] = frozenset().union(*(sources.get(i, {i}) for i in ins))
    last = {}
    for index, eqn in enumerate(eqns):
        for v in eqn.invars:
            if isinstance(v, core.Var):
                for s in sources.get(v, {v}):
                    last[s] = index
    for v in outputs:
        for s in sources.get(v, {v}):
            last[s] = len(eqns)
    inputs = set(jaxpr.invars) | set(jaxpr.constvars)
    live = peak = 0
    for index, eqn in enumerate(eqns):
        made = [v for v in eqn.outvars if not isinstance(v, core.DropVar) and v not in sources and v in last]
        out = sum(_nbytes(v.aval) for v in made)
        inner = max((peak_live_bytes(j) for j in _inner(eqn)), default=0)
        # An inner jaxpr's peak includes its outputs, but a scan's stacked outputs grow beside its body.
        peak = max(peak, live + (inner + out if eqn.primitive.name == "scan" else max(inner, out)))
        live += out
        ending = {s for v in eqn.invars if isinstance(v, core.Var) for s in sources.get(v, {v})}
        for v in ending:
            if last.get(v) == index and v not in inputs:
                live -= _nbytes(v.aval)
    return peak


def _needed(jaxpr) -> list:
    """The equations whose results the jaxpr's outputs depend on, or that have effects."""
    wanted = {v for v in jaxpr.outvars if isinstance(v, core.Var)}
    kept = []
    for eqn in reversed(jaxpr.eqns):
        if eqn.effects or any(v in wanted for v in eqn.outvars):
            kept.append(eqn)
            wanted.update(v for v in eqn.invars if isinstance(v, core.Var))
    return kept[::-1]


def residual_bytes(closed_jaxpr) -> int:
    """Bytes among a jaxpr's outputs that are not its inputs passed through (e.g. what a vjp keeps)."""
    jaxpr = closed_jaxpr.jaxpr
    inputs = set(jaxpr.invars) | set(jaxpr.constvars)
    seen = {v for v in jaxpr.outvars if isinstance(v, core.Var) and v not in inputs}
    return sum(_nbytes(v.aval) for v in seen)
