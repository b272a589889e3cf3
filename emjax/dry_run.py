"""Will a config fit, and how long will it take? The study's jitted steps, sized before renting a pod.

    python -m emjax.dry_run --config=gemma27b --devices=8 --hbm_gib=80 [--fit] [--estimate --device_kind=h100]
    python -m emjax.dry_run --config=gemma27b --topology=v5p:2x2x2 --hbm_gib=95   # libtpu installed
    python -m emjax.dry_run --config=gemma2_2b --measure                          # on a GPU or TPU host

The steps, built from abstract weights (nothing allocated, no checkpoint read;
the architecture is `model.arch`, else the checkpoint's config.json when at
hand, else the published one `model.published` names):

  extract  the forward pass to the deepest `extract.layers` layer, then an SAE
           encode of that residual at `--sae_width` features (JumpReLU, fp32);
  train    one LoRA optimiser step, the very function `emjax.train.finetune`
           jits (`emjax.train.jit_train_step`): train.batch_size rows as
           micro-batches of micro_batch_size (gradient accumulation), the
           config's remat policy and chunked cross-entropy;
  decode   one generated token per row with the KV cache (batch
           extract.batch_size, cache data.max_length tokens).

Per device, each step's bytes come from one of three sources, best first:

  compiled   an accelerator compiler's plan (`compiled.memory_analysis()`:
             arguments + outputs + temporaries - donated aliases): with
             --topology=NAME (a TPU slice, e.g. v5p:2x2x2, v5e:4x4, v6e:2x4,
             compiled by libtpu ahead of time from any host: `pip install
             'emjax[tpu]'`), or on a GPU/TPU host's own devices;
  analytic   otherwise: emjax.footprint's count of the arguments' shards, one
             layer group's gathered weights, what the remat policy stores per
             layer, and the working set of one group's step at per-device shapes;
  cpu        the CPU compiler's plan on N fake devices, printed beside the
             analytic count as a second opinion only: its temporaries are far
             larger than an accelerator's (bf16 computed in fp32, no
             accelerator memory scheduling).

A step fits when its bytes leave 10% of --hbm_gib free (--headroom); the
command exits 1 naming every step that does not. --fit picks the largest
training micro-batch (a divisor of train.batch_size and a multiple of the
data-parallel size; gradient accumulation for the rest) that fits, and prints
the override to use. --measure (on an accelerator) runs each step once on
constant weights, each in a fresh process, and prints the measured peak
(`memory_stats()["peak_bytes_in_use"]`) beside the estimates. --estimate
prints each stage's expected time on the devices (emjax.estimate).
"""

from __future__ import annotations

import os
import sys


def _flag(argv: list[str], name: str) -> str | None:
    found = [a.split("=", 1)[1] if "=" in a else "" for a in argv if a == f"--{name}" or a.startswith(f"--{name}=")]
    return found[-1] if found else None


_USER_PLATFORMS = os.environ.get("JAX_PLATFORMS")  # what --measure's children get back


def _choose_platform(argv: list[str]) -> None:
    """As a command, before jax is imported anywhere: N fake CPU devices for the CPU plan; the CPU alone
    for a TPU topology compile and for the parent of --measure (whose children take the accelerator)."""
    if _flag(argv, "measure_child") is not None:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # the peak is then the step's own
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
    if _flag(argv, "measure") is None and _flag(argv, "topology") is None:
        count = _flag(argv, "devices") or "1"
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={count}"


if __name__ == "__main__":
    _choose_platform(sys.argv[1:])

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any, NamedTuple  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

import emjax.models  # noqa: E402
from emjax import distributed, estimate, footprint, lora, train  # noqa: E402
from emjax.config import ConfigError, ExperimentConfig, apply_overrides, checkpoint_path, load_config  # noqa: E402
from emjax.models import layers, published  # noqa: E402
from emjax.models.checkpoint import Checkpoint  # noqa: E402
from emjax.sae.model import JumpReLUSAE  # noqa: E402

GIB = 2**30
# Gemma Scope's and Llama Scope's common residual SAE width (16k features).
DEFAULT_SAE_WIDTH = 16384
STEPS = ("extract", "train", "decode")
HEADROOM = 0.10  # share of the HBM a step must leave free to "fit"


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
    """Per-device bytes of one compiled step (compiled.memory_analysis())."""

    backend: str  # "cpu", "gpu", "tpu"
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int  # donated arguments reused as outputs

    @property
    def total_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

    def to_json(self) -> dict[str, Any]:
        return {"backend": self.backend, **dataclasses.asdict(self), "total_bytes": self.total_bytes}


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """One step's verdict: its per-device bytes from `source` against the HBM, with the other figures."""

    step: str
    source: str  # "compiled" (an accelerator's plan) or "analytic"
    total_bytes: int
    hbm_bytes: int
    headroom: float
    fits: bool
    analytic: footprint.Footprint
    compiled: CompiledMemory | None
    shapes: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        out = {
            "step": self.step,
            "fits": self.fits,
            "source": self.source,
            "total_bytes": self.total_bytes,
            "total_gib": round(self.total_bytes / GIB, 3),
            "hbm_gib": round(self.hbm_bytes / GIB, 3),
            "headroom": self.headroom,
            "analytic": footprint.describe(self.analytic),
        }
        if self.compiled is not None:
            key = "cpu_second_opinion" if self.compiled.backend == "cpu" else "compiled"
            out[key] = self.compiled.to_json()
        return out | {"shapes": self.shapes}


class StepProgram(NamedTuple):
    function: Any  # the jitted step
    arguments: tuple  # its abstract arguments (ShapeDtypeStructs with NamedShardings)
    shapes: dict[str, Any]  # batch, length, ... recorded in the report


def architecture(config: ExperimentConfig) -> tuple[dict, str]:
    """(transformers-style config dict, where it came from): model.arch, the checkpoint's
    config.json when it is at hand, else the published architecture named by model.published."""
    model = config.model
    if model.arch is not None:
        # As the build stage: the vocabulary of the trained tokenizer (at most tokenizer.vocab_size), padded to 128.
        return {"vocab_size": _round_up(config.tokenizer.vocab_size, 128)} | model.arch, "model.arch"
    try:
        path = checkpoint_path(model)
    except ConfigError:
        path = None
    if path is not None and (path / "config.json").is_file():
        return dict(Checkpoint(path).config), str(path / "config.json")
    if model.published:
        return published.config_json(model.published), f"emjax.models.published[{model.published!r}]"
    raise ConfigError(
        "dry run: the config has no model.arch, no checkpoint with a config.json, and no model.published "
        f"(one of: {', '.join(published.PUBLISHED)})"
    )


def _abstract_with_shardings(module, mesh: Mesh, rules) -> tuple[nnx.GraphDef, Any]:
    """(graphdef, state of ShapeDtypeStructs carrying each parameter's NamedSharding)."""
    graphdef, state = nnx.split(module)
    shardings = emjax.models.param_shardings(state, mesh, rules)
    flat = [
        (path, jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=shardings[".".join(map(str, path))]))
        for path, var in nnx.to_flat_state(state)
    ]
    return graphdef, nnx.from_flat_state(flat)


def _array(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def step_programs(
    config: ExperimentConfig,
    *,
    mesh: Mesh,
    steps: Sequence[str] = STEPS,
    sae_width: int = DEFAULT_SAE_WIDTH,
) -> dict[str, StepProgram]:
    """{step: the jitted function and its abstract arguments}, nothing lowered or compiled yet."""
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        raise ValueError(f"unknown dry-run steps {unknown}; the steps are {', '.join(STEPS)}")
    hf, _ = architecture(config)
    rules = distributed.rules_of(config.mesh)
    family = emjax.models.family_of(hf, source="config")
    cfg = family.config.from_hf(hf, source="config")
    dtype = layers.dtype_of(config.model.dtype)
    sharder = layers.Sharder(mesh, rules)
    # Donation as the target platform does it (a TPU topology compiled from a CPU host donates).
    donating = mesh.devices.flat[0].platform != "cpu"

    def make_model():
        return family.model(cfg, dtype=dtype, rngs=nnx.Rngs(0), sharder=sharder)

    batch_spec = distributed.batch_axes(mesh, rules) or None
    rows = NamedSharding(mesh, PartitionSpec(batch_spec, None))
    replicated = NamedSharding(mesh, PartitionSpec())
    programs = {}

    if "extract" in steps:
        deepest = max(config.extract.layers)
        batch, length = distributed.global_batch(config.extract.batch_size, mesh, rules), config.data.max_length
        graphdef, state = _abstract_with_shardings(nnx.eval_shape(make_model), mesh, rules)
        sae_graphdef, sae_state = _abstract_with_shardings(
            nnx.eval_shape(lambda: JumpReLUSAE(cfg.hidden_size, sae_width, rngs=nnx.Rngs(0))), mesh, rules
        )

        def extract(state, sae_state, tokens, attention_mask):
            out = nnx.merge(graphdef, state)(
                tokens, attention_mask=attention_mask, capture=(deepest,), stop_at_layer=deepest + 1
            )
            residual = out.captured[deepest]
            return residual, nnx.merge(sae_graphdef, sae_state).encode(residual)

        args = (state, sae_state, _array((batch, length), jnp.int32, rows), _array((batch, length), jnp.int32, rows))
        programs["extract"] = StepProgram(
            jax.jit(extract),
            args,
            dict(batch=batch, length=length, layer=deepest, sae_width=sae_width),
        )

    if "train" in steps:
        tc = config.train
        micro = tc.micro_batch_size or tc.batch_size
        plan = train.Plan.make(tc, rows=tc.batch_size, data_parallel=distributed.data_parallel_size(mesh, rules))
        length = tc.max_length or config.data.max_length
        model = nnx.eval_shape(lambda: lora.attach(make_model(), config.lora, seed=config.seed))
        # The pieces finetune builds from a model, here from the abstract one.
        graphdef, params, paths, base = train.split_adapters(model)
        base = _abstract_with_shardings(base, mesh, rules)[1]
        lora_shardings = emjax.models.param_shardings(nnx.state(model, lora.LoRAParam), mesh, rules)
        params = {name: _array(p.shape, p.dtype, lora_shardings[name]) for name, p in params.items()}
        optimizer, schedule = train.make_optimizer(tc, max(tc.max_steps or 1, tc.warmup_steps + 1))
        # Laid out as the real state is (optimizer.init of sharded factors, then distributed.onto_mesh):
        # each moment like its factor, step counters replicated.
        opt_state = jax.tree_util.tree_map_with_path(
            lambda path, s: _array(s.shape, s.dtype, _moment_sharding(path, s, params, replicated)),
            jax.eval_shape(optimizer.init, params),
        )
        state_shardings = jax.tree.map(lambda s: s.sharding, (params, opt_state))
        step_fn = train.jit_train_step(
            train.micro_batch_loss(graphdef, paths, tc), optimizer, schedule, seed=config.seed,
            state_shardings=state_shardings, donate=donating,
        )  # fmt: skip
        batch_sharding = NamedSharding(mesh, PartitionSpec(None, batch_spec, None))
        shape = (plan.accumulation, micro, length)
        batch = {
            "tokens": _array(shape, jnp.int32, batch_sharding),
            "loss_mask": _array(shape, jnp.int8, batch_sharding),
            "segments": _array(shape, jnp.int32, batch_sharding),
        }
        args = (params, opt_state, base, batch, _array((), jnp.int32, replicated))
        programs["train"] = StepProgram(
            step_fn,
            args,
            dict(
                accumulation=plan.accumulation, micro_batch=micro, length=length, lora_rank=config.lora.rank,
                remat=tc.remat, loss_chunk=tc.loss_chunk,
            ),
        )  # fmt: skip

    if "decode" in steps:
        batch, max_len = distributed.global_batch(config.extract.batch_size, mesh, rules), config.data.max_length
        model = nnx.eval_shape(make_model)
        graphdef, state = _abstract_with_shardings(model, mesh, rules)
        cache = _abstract_cache(model, batch, max_len, mesh, rules)

        # As emjax.models.jit_forward: weights an argument, the cache donated.
        def decode(state, tokens, attention_mask, cache):
            return nnx.merge(graphdef, state)(tokens, attention_mask=attention_mask, cache=cache)

        args = (state, _array((batch, 1), jnp.int32, rows), _array((batch, 1), jnp.int32, rows), cache)
        programs["decode"] = StepProgram(
            jax.jit(decode, donate_argnums=(3,) if donating else ()),
            args,
            dict(batch=batch, cache_tokens=max_len),
        )
    return programs


def _moment_sharding(path, leaf, params: dict, replicated: NamedSharding) -> NamedSharding:
    """An optimiser-state leaf keyed by a LoRA factor's name (Adam's mu and nu) is sharded like it."""
    name = getattr(path[-1], "key", None) if path else None
    if name in params and params[name].shape == leaf.shape:
        return params[name].sharding
    return replicated


def _abstract_cache(model, batch: int, max_len: int, mesh: Mesh, rules) -> layers.KVCache:
    """The KV cache's shapes, sharded as layers.shard_layer_cache keeps it (batch and kv heads split)."""
    cache = jax.eval_shape(lambda: model.init_cache(batch, max_len))

    def spec(*axes):
        return lambda s: _array(s.shape, s.dtype, distributed.named_sharding(axes, s.shape, mesh, rules))

    layer_caches = tuple(
        layers.LayerCache(
            k=spec("batch", "layers", None, "kv_heads", None)(c.k),
            v=spec("batch", "layers", None, "kv_heads", None)(c.v),
            index=spec("batch", "layers", None)(c.index),
        )
        for c in cache.layers
    )
    return layers.KVCache(
        layers=layer_caches,
        length=_array((), jnp.int32, NamedSharding(mesh, PartitionSpec())),
        next_position=spec("batch")(cache.next_position),
        max_len=max_len,
    )


# ---------------------------------------------------------------------------- memory


def compile_memory(program: StepProgram) -> tuple[Any, CompiledMemory]:
    """(the compiled step, its per-device memory as the backend's compiler plans it)."""
    compiled = program.function.lower(*program.arguments).compile()
    m = compiled.memory_analysis()
    platform = jax.tree.leaves(program.arguments)[0].sharding.mesh.devices.flat[0].platform
    return compiled, CompiledMemory(
        platform, int(m.argument_size_in_bytes), int(m.output_size_in_bytes), int(m.temp_size_in_bytes),
        int(m.alias_size_in_bytes),
    )  # fmt: skip


def analytic(
    config: ExperimentConfig, programs: dict[str, StepProgram], mesh: Mesh, *, sae_width: int
) -> dict[str, footprint.Footprint]:
    """emjax.footprint's count for each of `programs` (the config's steps on `mesh`)."""
    hf, _ = architecture(config)
    rules = distributed.rules_of(config.mesh)
    family = emjax.models.family_of(hf, source="config")
    cfg = family.config.from_hf(hf, source="config")
    local = footprint.local_config(config, hf, cfg, mesh, rules)
    one = distributed.make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])
    sae_local = max(1, sae_width // footprint.axis_size("sae", mesh, rules))
    local_programs = step_programs(local, mesh=one, steps=tuple(programs), sae_width=sae_local)
    local_hf, _ = architecture(local)
    local_cfg = family.config.from_hf(local_hf, source="config")
    return footprint.footprints(
        config, local, programs, local_programs, family=family, cfg=cfg, local_cfg=local_cfg,
        fsdp=footprint.axis_size("embed", mesh, rules) > 1,
    )  # fmt: skip


def dry_run(
    config: ExperimentConfig,
    *,
    devices: Sequence | None = None,
    hbm_gib: float = 16.0,
    steps: Sequence[str] = STEPS,
    sae_width: int = DEFAULT_SAE_WIDTH,
    compile_steps: bool = True,
    headroom: float = HEADROOM,
) -> list[StepMemory]:
    """Each step's per-device memory on the config's mesh over `devices` (default: all), judged against
    `hbm_gib` with `headroom`: an accelerator's compiled plan where the devices are accelerators (a TPU
    topology's included), else the analytic count, with the CPU plan beside it (`compile_steps`)."""
    mesh = distributed.mesh_of(config.mesh, devices)
    programs = step_programs(config, mesh=mesh, steps=steps, sae_width=sae_width)
    counted = analytic(config, programs, mesh, sae_width=sae_width)
    hbm = int(hbm_gib * GIB)
    reports = []
    for step, program in programs.items():
        compiled = compile_memory(program)[1] if compile_steps else None
        accelerator = compiled is not None and compiled.backend != "cpu"
        total = compiled.total_bytes if accelerator else counted[step].total
        reports.append(
            StepMemory(
                step, "compiled" if accelerator else "analytic", total, hbm, headroom,
                total <= (1 - headroom) * hbm, counted[step], compiled, program.shapes,
            )
        )  # fmt: skip
    return reports


def fit_micro_batch(
    config: ExperimentConfig, *, devices: Sequence | None = None, hbm_gib: float, headroom: float = HEADROOM,
    compile_steps: bool = False,
) -> tuple[int | None, list[StepMemory]]:  # fmt: skip
    """The largest training micro-batch that fits (None if none does) and the train reports tried, largest first.

    Candidates divide train.batch_size and are multiples of the data-parallel size; each is judged as
    dry_run judges the train step (compiled when the devices are accelerators, else counted)."""
    mesh = distributed.mesh_of(config.mesh, devices)
    parts = distributed.data_parallel_size(mesh, distributed.rules_of(config.mesh))
    batch = config.train.batch_size
    candidates = [m for m in range(batch, 0, -1) if batch % m == 0 and m % parts == 0]
    if not candidates:
        raise ConfigError(
            f"train.batch_size={batch} has no divisor that is a multiple of the data-parallel size {parts}"
        )
    tried = []
    for micro in candidates:
        trial = apply_overrides(config, [f"train.micro_batch_size={micro}"])
        (report,) = dry_run(
            trial, devices=devices, hbm_gib=hbm_gib, steps=("train",), compile_steps=compile_steps, headroom=headroom
        )
        tried.append(report)
        if report.fits:
            return micro, tried
    return None, tried


# ---------------------------------------------------------------------------- measured on an accelerator


def _constants(arguments):
    """Constant arrays laid out as the abstract `arguments`, made in place (no host copy, no temporary):
    0.01 for floats (finite activations, as real weights give), 1 for integer arrays, 0 for integer scalars."""

    def constant(abstract):
        if jnp.issubdtype(abstract.dtype, jax.dtypes.prng_key):
            return jax.random.split(jax.random.key(0), abstract.shape)
        value = 0 if not abstract.shape and jnp.issubdtype(abstract.dtype, jnp.integer) else 1
        return jnp.full(abstract.shape, 0.01 if jnp.issubdtype(abstract.dtype, jnp.floating) else value, abstract.dtype)

    shardings = jax.tree.map(lambda a: a.sharding, arguments)
    return jax.jit(lambda: jax.tree.map(constant, arguments), out_shardings=shardings)()


def measure_step(config: ExperimentConfig, step: str, *, sae_width: int, hbm_gib: float | None) -> dict[str, Any]:
    """Compile one step for this host's devices, run it once on constant weights, and report its
    measured peak (memory_stats()["peak_bytes_in_use"] of the first device) beside the estimates."""
    device = jax.devices()[0]
    mesh = distributed.mesh_of(config.mesh)
    program = step_programs(config, mesh=mesh, steps=(step,), sae_width=sae_width)[step]
    counted = analytic(config, {step: program}, mesh, sae_width=sae_width)[step]
    start = time.perf_counter()
    compiled, planned = compile_memory(program)  # compiled first: autotuning's buffers come and go before
    compile_s = time.perf_counter() - start
    arguments = _constants(program.arguments)
    jax.block_until_ready(arguments)
    before = device.memory_stats() or {}
    start = time.perf_counter()
    jax.block_until_ready(compiled(*arguments))
    run_s = time.perf_counter() - start
    stats = device.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    limit = hbm_gib * GIB if hbm_gib else stats.get("bytes_limit")
    return {
        "step": step,
        "device": device.device_kind,
        "devices": mesh.size,
        "measured_peak_bytes": peak,
        "arguments_in_use_bytes": before.get("bytes_in_use"),
        "compiled_bytes": planned.total_bytes,
        "analytic_bytes": counted.total,
        "compiled_over_measured": None if not peak else round(planned.total_bytes / peak, 3),
        "analytic_over_measured": None if not peak else round(counted.total / peak, 3),
        "hbm_bytes": limit,
        "compile_s": round(compile_s, 1),
        "run_s": round(run_s, 3),
        "analytic": footprint.describe(counted),
        "shapes": program.shapes,
    } | ({} if peak else {"note": f"{device.platform} reports no allocator statistics: measure on a GPU or TPU"})


def _measure_in_children(argv: Sequence[str], steps: Sequence[str]) -> list[dict]:
    """Each step in its own process (a fresh allocator, so its peak is that step's), all at once."""
    base = [a for a in argv if not a.startswith("--steps") and a != "--measure"]

    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    if _USER_PLATFORMS is not None:
        env["JAX_PLATFORMS"] = _USER_PLATFORMS

    def child(step):
        command = [sys.executable, "-m", "emjax.dry_run", *base, f"--steps={step}", "--measure_child"]
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        if result.returncode or not lines:
            return {"step": step, "error": (result.stderr.strip().splitlines() or ["no output"])[-1]}
        return json.loads(lines[-1])

    with concurrent.futures.ThreadPoolExecutor(len(steps)) as pool:
        return list(pool.map(child, steps))


# ---------------------------------------------------------------------------- the command


def topology_devices(name: str) -> list:
    """The devices of a TPU slice named like v5p:2x2x2, compiled for ahead of time through libtpu."""
    try:
        from jax.experimental import topologies

        return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
    except Exception as e:  # noqa: BLE001 - libtpu missing or the name unknown: say which, and how to fix it
        raise SystemExit(
            f"dry run: --topology={name} needs libtpu (pip install 'emjax[tpu]', i.e. the libtpu version "
            f"jax[tpu] pins) and a TPU slice name such as v5p:2x2x2, v5e:4x4 or v6e:2x4 ({type(e).__name__}: {e})"
        ) from None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m emjax.dry_run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny", help="configs/NAME.py or a path to a config file")
    parser.add_argument("--devices", type=int, default=1, help="fake CPU devices forming the mesh")
    parser.add_argument("--topology", help="a TPU slice (v5p:2x2x2, v5e:4x4, ...) compiled for through libtpu")
    parser.add_argument("--hbm_gib", type=float, help="memory per device, GiB (default: the device's, else 16)")
    parser.add_argument("--headroom", type=float, default=HEADROOM, help="share of the HBM a step leaves free")
    parser.add_argument("--sae_width", type=int, default=DEFAULT_SAE_WIDTH, help="SAE features of the extract step")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("--no_compile", action="store_true", help="skip the CPU compile (the second opinion)")
    parser.add_argument("--fit", action="store_true", help="pick the largest training micro-batch that fits")
    parser.add_argument("--measure", action="store_true", help="on an accelerator: run each step, print its peak")
    parser.add_argument("--measure_child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--estimate", action="store_true", help="print each stage's expected time")
    parser.add_argument("--device_kind", help=f"for --estimate on a CPU host: one of {', '.join(estimate.DEVICES)}")
    parser.add_argument("--mfu", type=float, default=estimate.MFU, help="model FLOPs utilisation assumed")
    parser.add_argument("--mbu", type=float, default=estimate.MBU, help="memory/interconnect bandwidth utilisation")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. mesh.tensor=4 train.batch_size=32")
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    # Overrides as emjax.main takes them (--config.mesh.tensor=4) or bare (mesh.tensor=4).
    overrides = [o.removeprefix("--config.") for o in [*args.overrides, *extra]]
    config = apply_overrides(load_config(args.config), overrides)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]

    if args.measure_child:
        (step,) = steps
        print(json.dumps(measure_step(config, step, sae_width=args.sae_width, hbm_gib=args.hbm_gib)), flush=True)
        return 0
    if args.measure:
        results = _measure_in_children(argv, steps)
        for r in results:
            print(json.dumps(r), flush=True)
        return 1 if any("error" in r for r in results) else 0

    devices = topology_devices(args.topology) if args.topology else None
    if devices is None and jax.device_count() != args.devices:
        parser.error(
            f"--devices={args.devices} but jax sees {jax.device_count()} devices: run as python -m emjax.dry_run"
        )
    kind = estimate.device_of(args.device_kind or args.topology)
    hbm_gib = args.hbm_gib or (kind.hbm_gib if kind else 16.0)
    _, source = architecture(config)
    header = {"config": config.name, "devices": len(devices or jax.devices()), "architecture": source}
    print(json.dumps(header | ({"topology": args.topology} if args.topology else {})), flush=True)
    if args.fit:
        micro, tried = fit_micro_batch(config, devices=devices, hbm_gib=hbm_gib, headroom=args.headroom,
                                       compile_steps=bool(args.topology))  # fmt: skip
        for r in tried:
            print(json.dumps({"fit_candidate": r.shapes["micro_batch"]} | r.to_json()), flush=True)
        if micro is None:
            print(f"dry run: no training micro-batch fits in {hbm_gib} GiB with {args.headroom:.0%} headroom",
                  file=sys.stderr)  # fmt: skip
            return 1
        accumulation = config.train.batch_size // micro
        print(json.dumps({"fit": {"train.micro_batch_size": micro, "accumulation": accumulation}}), flush=True)
        config = apply_overrides(config, [f"train.micro_batch_size={micro}"])
    reports = dry_run(
        config, devices=devices, hbm_gib=hbm_gib, steps=steps, sae_width=args.sae_width,
        compile_steps=not args.no_compile, headroom=args.headroom,
    )  # fmt: skip
    for report in reports:
        print(json.dumps(report.to_json()), flush=True)
    if args.estimate:
        if kind is None:
            parser.error(f"--estimate needs --device_kind (one of {', '.join(estimate.DEVICES)}) or --topology")
        mesh = distributed.mesh_of(config.mesh, devices)
        programs = step_programs(config, mesh=mesh, steps=STEPS, sae_width=args.sae_width)
        table = estimate.study_estimate(config, architecture(config)[0], programs, mesh, kind, mfu=args.mfu,
                                        mbu=args.mbu)  # fmt: skip
        for row in table:
            print(json.dumps(row), flush=True)
    too_big = [r for r in reports if not r.fits]
    for r in too_big:
        print(
            f"dry run: step {r.step!r} needs {r.total_bytes / GIB:.3f} GiB per device ({r.source}; "
            f"analytic terms {footprint.describe(r.analytic)}) > {1 - r.headroom:.0%} of --hbm_gib={hbm_gib}",
            file=sys.stderr,
        )
    return 1 if too_big else 0


if __name__ == "__main__":
    sys.exit(main())
