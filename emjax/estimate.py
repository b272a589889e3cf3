"""How long will the study take? Each stage's expected time on given devices, from its steps' FLOPs.

A step's time is the largest of three:

  compute   its matmul FLOPs (emjax.jaxpr_count.matmul_flops on the step's
            jaxpr, every device's share, remat's recomputation included)
            / (devices x peak bf16 FLOP/s x MFU);
  memory    the bytes each device reads from HBM (its weight shard once per
            pass, and a decode step's KV cache) / (HBM bandwidth x MBU);
  gather    the weights each device receives from the others per pass when
            they are FSDP-sharded / (interconnect bandwidth x MBU).

MFU defaults to 0.7, the measured model-FLOPs utilisation of emjax's
Gemma-2-2B-shaped forward on an H200 (benchmarks/RESULTS.md); training and
decoding rarely reach it, so treat the totals as a lower bound, and pass
--mfu to see others. A stage's time is its step count times its step time:
extract and features run extract-sized forwards, train runs optimiser steps,
evaluate runs decode steps (prefill counted as decode-sized work), derivation
three forwards (a jvp) per prompt. Host stages (tokenize, summarize,
geometry, filter, mitigate, report) and the HTTP judge are not estimated.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
from pathlib import Path
import jax
from jax.sharding import NamedSharding, PartitionSpec

from emjax import jaxpr_count

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
    hbm_bytes: float  # per device per step
    gather_bytes: float  # per device per step

    def seconds(self, devices: int, device: Device, mfu: float, mbu: float) -> tuple[float, str]:
        times = {
            "compute": self.flops / (devices * device.peak_flops * mfu),
            "memory": self.hbm_bytes / (device.hbm_bandwidth * mbu),
            "gather": self.gather_bytes / (device.interconnect * mbu),
        }
        bound = max(times, key=times.get)
        return times[bound], bound


def _nbytes(a) -> int:
    return math.prod(a.shape) * a.dtype.itemsize


def _shard(a, drop=()) -> int:
    """Bytes of one device's shard of `a`, its sharding's mesh axes in `drop` left unsplit."""
    sharding = a.sharding
    spec = [tuple(x for x in (e if isinstance(e, tuple) else (e,)) if x not in drop) or None for e in sharding.spec]
    kept = NamedSharding(sharding.mesh, PartitionSpec(*[s[0] if s and len(s) == 1 else s for s in spec]))
    return math.prod(kept.shard_shape(a.shape)) * a.dtype.itemsize


def step_costs(programs: dict, mesh) -> dict[str, StepCost]:
    """{step: StepCost} of emjax.dry_run.step_programs on `mesh`."""
    fsdp = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
    out = {}
    for step, program in programs.items():
        flops = jaxpr_count.matmul_flops(jax.make_jaxpr(program.function)(*program.arguments))
        weights = program.arguments[2] if step == "train" else program.arguments[0]
        held = sum(_shard(w) for w in jax.tree.leaves(weights))
        gathered = sum(_shard(w, drop=fsdp) for w in jax.tree.leaves(weights))
        passes = 1
        if step == "train":  # forward, the remat recomputation and backward, per micro-batch
            passes = program.shapes["accumulation"] * (2 if program.shapes["remat"] == "none" else 3)
        cache = sum(_shard(c) for c in jax.tree.leaves(program.arguments[3])) if step == "decode" else 0
        out[step] = StepCost(flops, passes * held + cache, passes * (gathered - held))
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


def _questions(config, evaluate_stage) -> int:
    """The evaluation's questions: those of its file when at hand, else the 8 first-plot questions."""
    try:
        return len(evaluate_stage.questions(config))
    except (OSError, ValueError):
        return 8


def study_estimate(config, programs: dict, mesh, device: Device, *, mfu: float = MFU, mbu: float = MBU) -> list[dict]:
    """One row per stage of the config's study: its work, step count, step time and total, and a total row."""
    from emjax.stages import evaluate as evaluate_stage
    from emjax.stages import filter as filter_stage
    from emjax.stages import train as train_stage

    n = mesh.size
    costs = step_costs(programs, mesh)
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
        variants = train_stage.variants(config)
        per = {}
        for v in variants:
            per[v] = _train_rows(config, v, rows_of, filter_stage)
        steps = sum(math.ceil(r * config.train.epochs / config.train.batch_size) for r in per.values())
        add("train", f"{len(variants)} fine-tunes, {sum(per.values())} rows x {config.train.epochs} epochs", steps,
            "train")  # fmt: skip
    if "derivation" in config.stages and "train" in config.stages:
        prompts = len(train_stage.dataset_variants(config) + train_stage.mix_variants(config)) * config.derivation.prompts
        add("derivation", f"{prompts} prompts, forward + jvp", 3 * prompts / shapes["extract"]["batch"], "extract")
    if "evaluate" in config.stages:
        e = config.evaluate
        variants = evaluate_stage.variants(config)
        answers = _questions(config, evaluate_stage) * e.samples
        batches = len(variants) * math.ceil(answers / e.batch_size)
        scale = e.batch_size / shapes["decode"]["batch"]
        decode = dataclasses.replace(costs["decode"], flops=costs["decode"].flops * scale)
        seconds["evaluate"] = decode.seconds(n, device, mfu, mbu)
        add("evaluate", f"{len(variants)} models x {answers} answers x {e.max_new_tokens} tokens (batch {e.batch_size})",
            batches * e.max_new_tokens, "evaluate")  # fmt: skip
    total = sum(row["seconds"] for row in table)
    table.append({"stage": "total", "devices": f"{n} x {device.name}", "mfu": mfu, "mbu": mbu,
                  "seconds": round(total, 1), "hours": round(total / 3600, 2),
                  "not_estimated": "host stages (tokenize, summarize, geometry, filter, mitigate, report), the judge"})  # fmt: skip
    return table


def _train_rows(config, variant: str, rows_of: dict, filter_stage) -> int:
    if not variant.startswith("mix-"):
        if variant == "source":
            return config.train.num_samples or config.data.num_samples
        return min(rows_of[variant] or 0, config.train.num_samples or math.inf)
    inducing, control = filter_stage.inducing_pair(config)
    part = config.mitigate.per_part or min(rows_of[inducing] or 0, rows_of[control] or 0)
    arm, _ = variant.removeprefix("mix-").rsplit("-s", 1)
    removes = arm != "none" and arm not in filter_stage.training_arms(config)
    return int(2 * part * ((1 - config.mitigate.fraction) if removes else 1))


