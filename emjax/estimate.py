"""How long will the study take? Each stage's expected time on given devices, from its steps' FLOPs.

A step's time is the largest of three:

  compute   its matmul FLOPs (emjax.jaxpr_count.matmul_flops on the step's
            jaxpr, every device's share, remat's recomputation included)
            / (devices x peak bf16 FLOP/s x MFU);
  memory    the bytes each device reads from HBM (its weight shard once per
            pass, and a decode step's KV cache) / (HBM bandwidth x MBU);
  interconnect  the weights each device receives from the other FSDP shards
            per pass, and the activations it all-reduces over the tensor
            axis (two per layer) / (NVLink or ICI bandwidth x MBU).

MFU defaults to 0.7, about what emjax's Gemma-2-2B-shaped forward reached on
an H200 (issue 25); training and decoding rarely do as well, so read the
totals as a lower bound, and pass --mfu to see others. A stage's time is its
step count times its step time: extract and features run extract-sized
forwards, train runs optimiser steps, derivation three forwards (a jvp) per
prompt, evaluate one extract-sized prefill per batch of prompts (an upper
bound) and max_new_tokens decode steps at evaluate.batch_size rows. Host
stages (tokenize, summarize, geometry, filter, mitigate, report) and the
HTTP judge are not estimated; nor are the dataset sizes when neither a
`limit` nor the file is at hand (they count as data.num_samples).
"""

from __future__ import annotations

import dataclasses
import gzip
import math
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from emjax import evaluate, jaxpr_count, mitigate, variant
from emjax.models import layers

MFU = 0.7  # measured: emjax's Gemma-2-2B-shaped forward on one H200
MBU = 0.7


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bandwidth: float  # bytes/s
    interconnect: float  # bytes/s one device receives (NVLink, ICI)
    hbm_gib: float


# Vendor datasheet figures per device.
DEVICES = {
    "h100": Device("NVIDIA H100 SXM", 989e12, 3.35e12, 450e9, 80.0),
    "h200": Device("NVIDIA H200", 989e12, 4.8e12, 450e9, 141e9 / 2**30),
    "a100": Device("NVIDIA A100 80GB", 312e12, 2.039e12, 300e9, 80.0),
    "v5p": Device("TPU v5p", 459e12, 2.765e12, 600e9, 95.0),
    "v5e": Device("TPU v5e", 197e12, 0.819e12, 200e9, 16.0),
    "v6e": Device("TPU v6e", 918e12, 1.64e12, 448e9, 32.0),
}
_ALIASES = {"tpu v5 lite": "v5e", "tpu v5": "v5p", "tpu v6 lite": "v6e", "v5litepod": "v5e"}


def device_of(name: str | None) -> Device | None:
    """The DEVICES entry a device kind or topology names ("h100", "NVIDIA H200", "v5p:2x2x2", "TPU v5 lite")."""
    if not name:
        return None
    key = name.lower().split(":")[0]
    for alias, kind in _ALIASES.items():
        if key == alias:
            return DEVICES[kind]
    return next((d for kind, d in DEVICES.items() if kind in key), None)


@dataclasses.dataclass(frozen=True)
class StepCost:
    flops: float  # all devices together
    weight_bytes: float  # per device: weight shards read from HBM
    gather_bytes: float  # per device: weights received from the other FSDP shards
    rows: int  # batch rows; the terms below scale with them
    cache_bytes: float = 0.0  # per device: the KV cache read (decode)
    reduce_bytes: float = 0.0  # per device: activations all-reduced over the tensor axis

    def with_rows(self, rows: int) -> StepCost:
        """The same step at another batch size (its weights read and gathered once either way)."""
        r = rows / self.rows
        return dataclasses.replace(
            self, flops=self.flops * r, cache_bytes=self.cache_bytes * r, reduce_bytes=self.reduce_bytes * r, rows=rows
        )

    def seconds(self, devices: int, device: Device, mfu: float, mbu: float) -> tuple[float, str]:
        """(the step's time, what bounds it: compute, memory or interconnect)."""
        times = {
            "compute": self.flops / (devices * device.peak_flops * mfu),
            "memory": (self.weight_bytes + self.cache_bytes) / (device.hbm_bandwidth * mbu),
            "interconnect": (self.gather_bytes + self.reduce_bytes) / (device.interconnect * mbu),
        }
        bound = max(times, key=times.get)
        return times[bound], bound


def _shard(a, drop=()) -> int:
    """Bytes of one device's shard of `a`, its sharding's mesh axes in `drop` left unsplit."""
    sharding = a.sharding
    spec = [tuple(x for x in (e if isinstance(e, tuple) else (e,)) if x not in drop) or None for e in sharding.spec]
    kept = NamedSharding(sharding.mesh, PartitionSpec(*[s[0] if s and len(s) == 1 else s for s in spec]))
    return math.prod(kept.shard_shape(a.shape)) * a.dtype.itemsize


def step_costs(programs: dict, mesh, *, hidden_size: int, num_layers: int, itemsize: int) -> dict[str, StepCost]:
    """{step: StepCost} of emjax.dry_run.step_programs on `mesh` (for a model of `num_layers` layers of width
    `hidden_size`, activations of `itemsize` bytes)."""
    fsdp = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
    tensor = mesh.shape["tensor"]
    data_parallel = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
    out = {}
    for step, program in programs.items():
        shapes = program.shapes
        flops = jaxpr_count.matmul_flops(jax.make_jaxpr(program.function)(*program.arguments))
        weights = program.arguments[2] if step == "train" else program.arguments[0]
        held = sum(_shard(w) for w in jax.tree.leaves(weights))
        gathered = sum(_shard(w, drop=fsdp) for w in jax.tree.leaves(weights))
        passes, rows, tokens, layers = 1, shapes.get("batch"), 0, num_layers
        if step == "train":  # forward, the remat recomputation and backward, per micro-batch
            passes = shapes["accumulation"] * (2 if shapes["remat"] == "none" else 3)
            rows = shapes["accumulation"] * shapes["micro_batch"]
            tokens = shapes["micro_batch"] * shapes["length"]
        elif step == "extract":
            tokens, layers = rows * shapes["length"], shapes["layer"] + 1
        else:
            tokens = rows
        cache = sum(_shard(c) for c in jax.tree.leaves(program.arguments[3])) if step == "decode" else 0
        # Two all-reduces (attention's and the MLP's outputs) per layer, a ring moving 2 (t - 1) / t of each.
        reduce = passes * layers * 2 * 2 * (tensor - 1) / tensor * tokens / data_parallel * hidden_size * itemsize
        out[step] = StepCost(flops, passes * held, passes * (gathered - held), rows, cache, reduce)
    return out


def _rows(dataset, fallback: int | None = None) -> int | None:
    """Rows a study dataset contributes: its limit, else the lines of its file when at hand."""
    if dataset.limit:
        return int(dataset.limit)
    path = Path(str(dataset.source))
    if path.is_file() and path.suffix in (".jsonl", ".gz", ".csv"):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as f:
            return sum(1 for _ in f) - (1 if path.suffix == ".csv" else 0)
    return fallback


def _questions(config) -> int:
    """The evaluation's questions: those of its file when at hand, else the 8 first-plot questions."""
    try:
        return len(evaluate.questions_of(config.evaluate))
    except (OSError, ValueError):
        return 8


def study_estimate(
    config, hf: dict, programs: dict, mesh, device: Device, *, mfu: float = MFU, mbu: float = MBU
) -> list[dict]:
    """One row per stage of the config's study: its work, step count, step time and total, and a total row."""
    n = mesh.size
    itemsize = np.dtype(layers.dtype_of(config.model.dtype)).itemsize
    costs = step_costs(programs, mesh, hidden_size=int(hf["hidden_size"]), num_layers=int(hf["num_hidden_layers"]),
                       itemsize=itemsize)  # fmt: skip
    seconds = {step: cost.seconds(n, device, mfu, mbu) for step, cost in costs.items()}
    shapes = {step: p.shapes for step, p in programs.items()}
    extract_tokens = shapes["extract"]["batch"] * shapes["extract"]["length"]
    rows_of = {name: _rows(d, config.data.num_samples) for name, d in config.datasets.items()}
    table = []

    def add(stage, work, steps, step):
        time, bound = seconds[step]
        table.append({"stage": stage, "work": work, "steps": steps, "step_s": round(time, 4), "bound": bound,
                      "seconds": round(steps * time, 1)})  # fmt: skip

    if "extract" in config.stages:
        batches = -(-config.data.num_samples // config.extract.batch_size)
        add("extract", f"{config.data.num_samples} rows x {config.data.max_length} tokens", batches, "extract")
    if "features" in config.stages and config.datasets:
        length = config.features.max_length or config.data.max_length
        tokens = sum(r or 0 for r in rows_of.values()) * length
        add("features", f"{len(rows_of)} datasets, {tokens} tokens", tokens / extract_tokens, "extract")
    if "train" in config.stages:
        variants = variant.train_variants(config)
        per = {}
        for v in variants:
            per[v] = _train_rows(config, v, rows_of)
        steps = sum(math.ceil(r * config.train.epochs / config.train.batch_size) for r in per.values())
        add("train", f"{len(variants)} fine-tunes, {sum(per.values())} rows x {config.train.epochs} epochs", steps,
            "train")  # fmt: skip
    if "derivation" in config.stages and "train" in config.stages:
        fine_tunes = variant.dataset_variants(config) + variant.mix_variants(config)
        prompts = len(fine_tunes) * config.derivation.prompts
        add("derivation", f"{prompts} prompts, forward + jvp", 3 * prompts / shapes["extract"]["batch"], "extract")
    if "evaluate" in config.stages:
        e = config.evaluate
        variants = variant.evaluate_variants(config)
        answers = _questions(config) * e.samples
        batches = len(variants) * math.ceil(answers / e.batch_size)
        seconds["evaluate"] = costs["decode"].with_rows(e.batch_size).seconds(n, device, mfu, mbu)
        add("evaluate: prefill", f"{batches} batches of {e.batch_size} prompts", batches, "extract")
        add("evaluate: decode", f"{len(variants)} models x {answers} answers x {e.max_new_tokens} tokens "
            f"(batch {e.batch_size})", batches * e.max_new_tokens, "evaluate")  # fmt: skip
    total = sum(row["seconds"] for row in table)
    table.append({"stage": "total", "devices": f"{n} x {device.name}", "mfu": mfu, "mbu": mbu,
                  "seconds": round(total, 1), "hours": round(total / 3600, 2),
                  "not_estimated": "the host stages (tokenize, summarize, geometry, filter, mitigate, report), "
                                   "the judge"})  # fmt: skip
    return table


def _train_rows(config, name: str, rows_of: dict) -> int:
    v = variant.Variant.parse(name)
    if not v.is_mix:
        if name == "source":
            return config.train.num_samples or config.data.num_samples
        return min(rows_of[name] or 0, config.train.num_samples or math.inf)
    inducing, control = mitigate.inducing_pair(config)
    part = config.mitigate.per_part or min(rows_of[inducing] or 0, rows_of[control] or 0)
    removes = v.arm != "none" and v.arm not in mitigate.training_arms(config.mitigate)
    return int(2 * part * ((1 - config.mitigate.fraction) if removes else 1))


