"""Counts on a program's jaxpr: matmul FLOPs (loops multiplied out) and the most bytes alive at once.

XLA's cost analysis counts a while loop's body once, so a scanned model's
compiled FLOPs do not grow with depth; these counts walk the jaxpr instead,
multiplying a scan's body by its length. Both see the program before XLA
fuses it: the FLOPs are those of dot_general and ragged_dot (elementwise work
is left out, as MFU conventions do), and the peak counts every intermediate an
unfused program would hold, an upper bound of what the compiler keeps.
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
    return [j.jaxpr if isinstance(j, core.ClosedJaxpr) else j for j in core.jaxprs_in_params(eqn.params)]


def _times(eqn) -> int:
    """How often an equation runs its inner jaxpr: a scan's length, else once."""
    return int(eqn.params.get("length", 1)) if eqn.primitive.name == "scan" else 1


def matmul_flops(jaxpr) -> int:
    """2 x multiply-adds of every dot_general and ragged_dot, scan bodies times their length.

    A shard_map body's shapes are per shard: its FLOPs are multiplied by the
    number of shards, so the total is the whole program's over all devices.
    A cond counts its most expensive branch; a while loop's body counts once.
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0
    for eqn in jaxpr.eqns:
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


# Equations whose output XLA lays over their input's buffer (a bitcast), and transposes it folds into
# the dot_general that consumes them: no bytes of their own.
_ALIASING = ("reshape", "squeeze", "expand_dims")


def peak_live_bytes(jaxpr) -> int:
    """The most bytes of intermediate values alive at once (the jaxpr's own inputs left out).

    A value lives from the equation that makes it to its last use (to the end
    for outputs). A reshape, or a transpose read only by matmuls, shares its
    input's buffer (XLA bitcasts the one and folds the other into the matmul).
    An equation with inner jaxprs adds their own peak to what is alive around
    it (and a scan its stacked outputs besides, which exist while its body runs).
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    readers: dict = {}
    for eqn in jaxpr.eqns:
        for v in eqn.invars:
            if isinstance(v, core.Var):
                readers.setdefault(v, []).append(eqn.primitive.name)
    root = {}  # an aliasing equation's output -> the value whose buffer it shares
    for eqn in jaxpr.eqns:
        name, source = eqn.primitive.name, eqn.invars[0] if eqn.invars else None
        folds = name == "transpose" and all(r == "dot_general" for r in readers.get(eqn.outvars[0], ["?"]))
        if isinstance(source, core.Var) and (name in _ALIASING or folds):
            root[eqn.outvars[0]] = root.get(source, source)
    last = {}
    for index, eqn in enumerate(jaxpr.eqns):
        for v in eqn.invars:
            if isinstance(v, core.Var):
                last[root.get(v, v)] = index
    for v in jaxpr.outvars:
        if isinstance(v, core.Var):
            last[root.get(v, v)] = len(jaxpr.eqns)
    inputs = set(jaxpr.invars) | set(jaxpr.constvars)
    live = peak = 0
    for index, eqn in enumerate(jaxpr.eqns):
        made = [v for v in eqn.outvars if not isinstance(v, core.DropVar) and v not in root and v in last]
        out = sum(_nbytes(v.aval) for v in made)
        inner = max((peak_live_bytes(j) for j in _inner(eqn)), default=0)
        # An inner jaxpr's peak includes its outputs, but a scan's stacked outputs grow beside its body.
        peak = max(peak, live + (inner + out if eqn.primitive.name == "scan" else max(inner, out)))
        live += out
        ending = {root.get(v, v) for v in eqn.invars if isinstance(v, core.Var)}
        for v in ending:
            if last.get(v) == index and v not in inputs:
                live -= _nbytes(v.aval)
    return peak


def residual_bytes(closed_jaxpr) -> int:
    """Bytes among a jaxpr's outputs that are not its inputs passed through (e.g. what a vjp keeps)."""
    jaxpr = closed_jaxpr.jaxpr
    inputs = set(jaxpr.invars) | set(jaxpr.constvars)
    seen = {v for v in jaxpr.outvars if isinstance(v, core.Var) and v not in inputs}
    return sum(_nbytes(v.aval) for v in seen)
