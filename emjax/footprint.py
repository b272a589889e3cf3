"""Per-device memory of the dry run's steps, counted rather than compiled.

For a step on a mesh, the bytes one device holds at its peak:

  arguments    every argument's shard the step reads, exactly (weights, LoRA
               factors and Adam moments, the KV cache, the SAE, the batch),
               from the abstract arrays' NamedShardings;
  gathered     with FSDP, one layer group's weights as it all-gathers them for
               compute (split only over tensor and expert), and the embedding
               table gathered for the lookup (and the untied head);
  stored       training only: what the step's remat policy keeps of each layer
               group for the backward pass (the residuals of one group's vjp
               plus its input, which the layer scan stacks), for every group
               but the one the next term holds, twice: the forward scan's
               stacked residuals and the backward scan's copy of them (libtpu's
               plans grow by 1.9-2.1x the residuals per added layer, FSDP or
               tensor-parallel; benchmarks/RESULTS.md);
  working      the most bytes alive at once in the very step function traced
               for ONE layer group at per-device shapes (batch / data-parallel
               size; heads, kv heads, MLP, vocabulary, SAE features and experts
               / their mesh axes), counted on its unfused jaxpr
               (emjax.jaxpr_count.peak_live_bytes): the forward of a group,
               the chunked cross-entropy, the backward, the optimiser update.

Every term follows from shapes and the remat policy. Counting
an unfused program overstates what a compiler that fuses elementwise chains
keeps, so the total leans high (the safe side for "will it fit").
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend import core

from emjax import distributed, jaxpr_count, lora, train
from emjax.models import decoder, layers

TERMS = ("arguments", "gathered", "stored", "working")
SCAN_RESIDUAL_COPIES = 2  # the forward scan's stacked residuals, and the backward scan's copy


@dataclasses.dataclass(frozen=True)
class Footprint:
    step: str
    terms: dict[str, int]  # TERMS -> bytes per device

    @property
    def total(self) -> int:
        return sum(self.terms.values())


def shard_bytes(tree) -> int:
    """Bytes one device holds of the abstract arrays in `tree` (the largest shard of each)."""
    total = 0
    for a in jax.tree.leaves(tree):
        sharding = getattr(a, "sharding", None)
        shape = sharding.shard_shape(a.shape) if sharding is not None else a.shape
        total += math.prod(shape) * _itemsize(a.dtype)
    return total


def _itemsize(dtype) -> int:
    try:
        return np.dtype(dtype).itemsize
    except TypeError:  # PRNG keys
        return 8


def axis_size(logical: str, mesh, rules) -> int:
    """How many ways the logical axis is split on the mesh."""
    return math.prod(mesh.shape[a] for a in rules.get(logical, ()))


def local_architecture(hf: dict, cfg, mesh, rules) -> dict:
    """The config.json of one device's share of the computation, for one layer group: heads, kv heads,
    MLP width, vocabulary and experts divided by their mesh axes; `period` layers."""
    local = dict(hf)
    for key, logical in (
        ("num_attention_heads", "heads"), ("num_key_value_heads", "kv_heads"), ("intermediate_size", "mlp"),
        ("vocab_size", "vocab"), ("num_local_experts", "experts"),
    ):  # fmt: skip
        if key in local and local[key]:
            local[key] = int(local[key]) // axis_size(logical, mesh, rules)
    if "num_key_value_heads" not in hf:  # the family defaults kv heads to the (now divided) heads
        local["num_key_value_heads"] = local["num_attention_heads"]
    if "head_dim" not in hf:  # the family derives head_dim from the undivided heads
        local["head_dim"] = cfg.head_dim
    period = decoder.layer_period(cfg)
    local["num_hidden_layers"] = period
    if getattr(cfg, "layer_types", None):
        local["layer_types"] = list(cfg.layer_types[:period])
    local["num_experts_per_tok"] = min(int(local.get("num_experts_per_tok") or 1), local.get("num_local_experts") or 1)
    local.pop("experts_per_token", None)
    return local


def local_config(config, hf: dict, cfg, mesh, rules):
    """The experiment config of one device, one layer group (see local_architecture), on a 1-device mesh;
    its batches are the config's split over the batch axes."""
    parts = distributed.data_parallel_size(mesh, rules)
    local = copy.deepcopy(config)
    local.model.arch = local_architecture(hf, cfg, mesh, rules)
    local.model.checkpoint = local.model.checkpoint_env = None
    local.mesh = dataclasses.replace(local.mesh, data=1, fsdp=1, tensor=1, expert=1, rules=None)
    local.extract.layers = (decoder.layer_period(cfg) - 1,)
    local.extract.batch_size = max(1, -(-config.extract.batch_size // parts))
    micro = config.train.micro_batch_size or config.train.batch_size
    local.train.batch_size = local.train.micro_batch_size = max(1, micro // parts)
    local.train.loss_chunk = max(1, config.train.loss_chunk // parts)  # as many positions per chunk
    local.lora = dataclasses.replace(config.lora, layers=None)  # the group's layers, adapted as the model's are
    return local


def footprints(
    config, local, programs: dict, local_programs: dict, *, family, cfg, local_cfg, fsdp: bool
) -> dict[str, Footprint]:
    """{step: Footprint} of `programs` (emjax.dry_run.step_programs of `config` on its mesh; cfg its model
    config) given `local_programs`, the same steps of `local` = local_config(config, ...) on one device
    (local_cfg its model config); `fsdp`: whether the mesh splits the weights' embed dimension."""
    gathered = 0
    if fsdp:
        model = nnx.eval_shape(lambda: family.model(local_cfg, dtype=_dtype(config), rngs=nnx.Rngs(0)))
        gathered = _gathered_bytes(model)
    out = {}
    for step, program in programs.items():
        lp = local_programs[step]
        working = jaxpr_count.peak_live_bytes(jax.make_jaxpr(lp.function)(*lp.arguments))
        arguments = shard_bytes(used_arguments(program.function, program.arguments))
        stored = 0
        if step == "train":
            groups = cfg.num_layers // decoder.layer_period(cfg)
            stored = SCAN_RESIDUAL_COPIES * (groups - 1) * _group_residual_bytes(config, local, family, local_cfg)
        terms = dict(arguments=arguments, gathered=gathered, stored=stored, working=working)
        out[step] = Footprint(step, terms)
    return out


def used_arguments(function, arguments) -> list:
    """The leaves of `arguments` the jitted `function` reads (jit drops the others, e.g. an SAE's
    decoder in an encode-only step), from the jaxpr of its body."""
    closed = jax.make_jaxpr(function)(*arguments)
    leaves = jax.tree.leaves(arguments)
    (eqn,) = closed.jaxpr.eqns if len(closed.jaxpr.eqns) == 1 else (None,)
    if eqn is None or "jaxpr" not in eqn.params or len(eqn.invars) != len(leaves):
        return leaves
    inner = eqn.params["jaxpr"].jaxpr
    read = {v for v in [*(v for e in inner.eqns for v in e.invars), *inner.outvars] if isinstance(v, core.Var)}
    return [leaf for leaf, v in zip(leaves, inner.invars) if v in read]


def _dtype(config):
    return layers.dtype_of(config.model.dtype)


def _gathered_bytes(model) -> int:
    """One layer group's weights and the embedding table (and untied head), at gathered per-device shapes."""
    group = sum(math.prod(v.shape) * _itemsize(v.dtype) for v in jax.tree.leaves(nnx.state(model.blocks, nnx.Param)))
    table = math.prod(model.embed.shape) * _itemsize(model.embed.dtype)
    if not model.config.tie_word_embeddings:
        table += math.prod(model.head.shape) * _itemsize(model.head.dtype)
    return group + table


def _group_residual_bytes(config, local, family, local_cfg) -> int:
    """What the training forward keeps for the backward pass of one layer group: its input, and the residuals
    of its vjp (towards the input and the LoRA factors) under the step's remat policy."""
    dtype = _dtype(config)
    model = nnx.eval_shape(lambda: lora.attach(family.model(local_cfg, dtype=dtype, rngs=nnx.Rngs(0)), local.lora))
    stack = model.blocks
    parts = [nnx.split(m, lora.LoRAParam, ...) for m in stack.layers]
    graphdefs = [g for g, _, _ in parts]

    def one_group(tree):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), tree)

    factors = tuple(one_group(f) for _, f, _ in parts)
    rest = tuple(one_group(r) for _, _, r in parts)
    batch, length = local.train.batch_size, local.train.max_length or local.data.max_length
    x = jax.ShapeDtypeStruct((batch, length, local_cfg.hidden_size), dtype)
    segments = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    policy = train.REMAT_POLICIES[config.train.remat]

    def body(x, factors, rest, segments):
        q_index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        inputs = dict(
            positions=layers.positions_in_segments(segments), q_index=q_index, new_index=q_index,
            start=jnp.zeros((), jnp.int32), segments=segments,
        )  # fmt: skip
        for j, graphdef in enumerate(graphdefs):
            run = functools.partial(_run_block, graphdef, inputs=inputs)
            if policy is not None:
                run = jax.checkpoint(run, policy=policy, prevent_cse=False)
            x = run(factors[j], rest[j], x)
        return x

    def keeps(x, factors, rest, segments):
        return jax.vjp(lambda x, f: body(x, f, rest, segments), x, factors)[1]

    kept = jaxpr_count.residual_bytes(jax.make_jaxpr(keeps)(x, factors, rest, segments))
    return kept + math.prod(x.shape) * _itemsize(dtype)


def _run_block(graphdef, factors, rest, x, *, inputs):
    return nnx.merge(graphdef, factors, rest)(x, cache=None, **inputs)[0]


def describe(fp: Footprint) -> dict[str, Any]:
    """The footprint as the dry run prints it: each term and the total, in bytes."""
    return {"total_bytes": fp.total, **{f"{k}_bytes": v for k, v in fp.terms.items()}}
