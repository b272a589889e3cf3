"""Will a config fit? Compile its jitted steps ahead of time for an N-device mesh and read their memory.

    python -m emjax.dry_run --config=gemma27b --devices=8 --hbm_gib=16 [--config.mesh.tensor=2 ...]

From a CPU host, with N fake CPU devices (the command sets
XLA_FLAGS=--xla_force_host_platform_device_count=N and JAX_PLATFORMS=cpu
before jax is imported), it lowers and compiles, for the config's mesh:

  extract  the forward pass to the deepest `extract.layers` layer, then an SAE
           encode of that residual at `--sae_width` features (JumpReLU, fp32);
  train    one LoRA optimiser step, the very function `emjax.train.finetune`
           jits (`emjax.train.jit_train_step`), at train.batch_size /
           micro_batch_size and the training length;
  decode   one generated token per row with the KV cache (batch
           extract.batch_size, cache data.max_length tokens).

Weights are abstract (jax.ShapeDtypeStruct with the NamedShardings of
`emjax.models.param_shardings`): nothing is allocated and no checkpoint is
read. The architecture comes from `model.arch` (the tiny default), else the
checkpoint's config.json when the checkpoint is at hand, else the published
architecture the config names (`model.published`, see
emjax.models.published). One JSON object per step is printed, with the
per-device argument_bytes, output_bytes, temp_bytes, total_bytes (from
`compiled.memory_analysis()`; total = arguments + outputs + temporaries -
donated aliases) and `fits` against --hbm_gib; the command exits 1 naming
every step that does not fit.

Argument and output bytes follow from the shardings and hold on any backend.
Temporaries are the backend compiler's plan, and the CPU backend's is far
larger than an accelerator's: for gemma27b's decode step on 8 fake FSDP
devices it reports about 106 GiB of temporaries with bf16 weights and 116 GiB
with fp32 ones, i.e. every layer's all-gathered weights alive at once, in
fp32. So a CPU `fits: false` driven by temp_bytes asks for the topology
check. For the real figure on a TPU slice, compile for
its topology from any host where libtpu is installed (no TPU needed), as
MaxText's AOT check does:

    from jax.experimental import topologies
    from emjax import config as C, dry_run
    topo = topologies.get_topology_desc(topology_name="v5e:4x4", platform="tpu")  # TPU name:shape
    reports = dry_run.dry_run(C.load_config("gemma27b"), devices=topo.devices, hbm_gib=16)

(run without the fake-device flags, i.e. not via `python -m emjax.dry_run`;
`get_topology_desc` also takes chip_config_name, chips_per_host_bounds and
num_slices for multi-slice shapes).
"""

from __future__ import annotations

import os
import sys


def _use_fake_cpu_devices(argv: list[str]) -> None:
    """As a command: N fake CPU devices, set before jax is imported anywhere."""
    devices = [a.split("=", 1)[1] for a in argv if a.startswith("--devices=")]
    count = devices[-1] if devices else "1"
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={count}"
    os.environ["JAX_PLATFORMS"] = "cpu"


if __name__ == "__main__":
    _use_fake_cpu_devices(sys.argv[1:])

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any, NamedTuple  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

import emjax.models  # noqa: E402
from emjax import distributed, lora, train  # noqa: E402
from emjax.config import ConfigError, ExperimentConfig, apply_overrides, checkpoint_path, load_config  # noqa: E402
from emjax.models import layers, published  # noqa: E402
from emjax.models.checkpoint import Checkpoint  # noqa: E402
from emjax.sae.model import JumpReLUSAE  # noqa: E402

GIB = 2**30
# Gemma Scope's and Llama Scope's common residual SAE width (16k features).
DEFAULT_SAE_WIDTH = 16384
STEPS = ("extract", "train", "decode")


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Per-device bytes of one compiled step."""

    step: str
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int  # donated arguments reused as outputs
    total_bytes: int
    hbm_bytes: int
    fits: bool
    shapes: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"total_gib": round(self.total_bytes / GIB, 4)}


class StepProgram(NamedTuple):
    function: Any  # the jitted step
    arguments: tuple  # its abstract arguments (ShapeDtypeStructs with NamedShardings)
    shapes: dict[str, Any]  # batch, length, ... recorded in the report


class CompiledStep(NamedTuple):
    executable: Any  # jax.stages.Compiled
    arguments: tuple
    shapes: dict[str, Any]


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


def _measure(step: str, compiled, hbm_bytes: int, shapes: dict) -> StepMemory:
    m = compiled.memory_analysis()
    argument, output = int(m.argument_size_in_bytes), int(m.output_size_in_bytes)
    temp, alias = int(m.temp_size_in_bytes), int(m.alias_size_in_bytes)
    total = argument + output + temp - alias
    return StepMemory(step, argument, output, temp, alias, total, hbm_bytes, total <= hbm_bytes, shapes)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def compile_steps(
    config: ExperimentConfig,
    *,
    mesh: Mesh,
    steps: Sequence[str] = STEPS,
    sae_width: int = DEFAULT_SAE_WIDTH,
) -> dict[str, CompiledStep]:
    """{step: CompiledStep} for the config's steps on `mesh`, from abstract weights."""
    programs = step_programs(config, mesh=mesh, steps=steps, sae_width=sae_width)
    return {
        step: CompiledStep(p.function.lower(*p.arguments).compile(), p.arguments, p.shapes)
        for step, p in programs.items()
    }


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
    rules = distributed.DEFAULT_RULES | {k: tuple(v) for k, v in (config.mesh.rules or {}).items()}
    family = emjax.models.family_of(hf, source="config")
    cfg = family.config.from_hf(hf, source="config")
    dtype = layers.dtype_of(config.model.dtype)
    sharder = layers.Sharder(mesh, rules)

    def make_model():
        return family.model(cfg, dtype=dtype, rngs=nnx.Rngs(0), sharder=sharder)

    parts = math.prod(mesh.shape[a] for a in distributed.batch_axes(mesh, rules))
    batch_spec = distributed.batch_axes(mesh, rules) or None
    rows = NamedSharding(mesh, PartitionSpec(batch_spec, None))
    replicated = NamedSharding(mesh, PartitionSpec())
    programs = {}

    if "extract" in steps:
        deepest = max(config.extract.layers)
        batch, length = _round_up(config.extract.batch_size, parts), config.data.max_length
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
        plan = train.Plan.make(tc, rows=tc.batch_size, data_parallel=parts)
        length = tc.max_length or config.data.max_length
        model = nnx.eval_shape(lambda: lora.attach(make_model(), config.lora, seed=config.seed))
        # The pieces finetune builds from a model, here from the abstract one.
        graphdef, params, paths, base = train._split(model)
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
        loss_sums = functools.partial(
            train._loss_sums, graphdef=graphdef, paths=paths, remat=train.REMAT_POLICIES[tc.remat]
        )
        step_fn = train.jit_train_step(
            loss_sums, optimizer, schedule, seed=config.seed, state_shardings=state_shardings
        )
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
            dict(accumulation=plan.accumulation, micro_batch=micro, length=length, lora_rank=config.lora.rank),
        )

    if "decode" in steps:
        batch, max_len = _round_up(config.extract.batch_size, parts), config.data.max_length
        model = nnx.eval_shape(make_model)
        graphdef, state = _abstract_with_shardings(model, mesh, rules)
        cache = _abstract_cache(model, batch, max_len, mesh, rules)

        # As emjax.models.jit_forward: weights an argument, the cache donated.
        def decode(state, tokens, attention_mask, cache):
            return nnx.merge(graphdef, state)(tokens, attention_mask=attention_mask, cache=cache)

        donate = () if mesh.devices.flat[0].platform == "cpu" else (3,)
        args = (state, _array((batch, 1), jnp.int32, rows), _array((batch, 1), jnp.int32, rows), cache)
        programs["decode"] = StepProgram(
            jax.jit(decode, donate_argnums=donate),
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
            k=spec("batch", None, "kv_heads", None)(c.k),
            v=spec("batch", None, "kv_heads", None)(c.v),
            index=spec("batch", None)(c.index),
        )
        for c in cache.layers
    )
    return layers.KVCache(
        layers=layer_caches,
        length=_array((), jnp.int32, NamedSharding(mesh, PartitionSpec())),
        next_position=spec("batch")(cache.next_position),
        max_len=max_len,
    )


def dry_run(
    config: ExperimentConfig,
    *,
    devices: Sequence | None = None,
    hbm_gib: float = 16.0,
    steps: Sequence[str] = STEPS,
    sae_width: int = DEFAULT_SAE_WIDTH,
) -> list[StepMemory]:
    """Per-device memory of each step compiled for the config's mesh over `devices` (default: all)."""
    mc = config.mesh
    mesh = distributed.make_mesh(mc.data, mc.fsdp, mc.tensor, mc.expert, devices=devices)
    return measure(compile_steps(config, mesh=mesh, steps=steps, sae_width=sae_width), hbm_gib)


def measure(compiled: dict[str, CompiledStep], hbm_gib: float) -> list[StepMemory]:
    """Each compiled step's per-device memory (compiled.memory_analysis()) against `hbm_gib` GiB."""
    hbm_bytes = int(hbm_gib * GIB)
    return [_measure(step, c.executable, hbm_bytes, c.shapes) for step, c in compiled.items()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emjax.dry_run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny", help="configs/NAME.py or a path to a config file")
    parser.add_argument("--devices", type=int, default=1, help="fake CPU devices forming the mesh")
    parser.add_argument("--hbm_gib", type=float, default=16.0, help="memory per device, GiB")
    parser.add_argument("--sae_width", type=int, default=DEFAULT_SAE_WIDTH, help="SAE features of the extract step")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. mesh.tensor=4 train.batch_size=32")
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if jax.device_count() != args.devices:
        parser.error(
            f"--devices={args.devices} but jax sees {jax.device_count()} devices: run as python -m emjax.dry_run"
        )
    # Overrides as emjax.main takes them (--config.mesh.tensor=4) or bare (mesh.tensor=4).
    overrides = [o.removeprefix("--config.") for o in [*args.overrides, *extra]]
    config = apply_overrides(load_config(args.config), overrides)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    _, source = architecture(config)
    print(json.dumps({"config": config.name, "devices": args.devices, "architecture": source}), flush=True)
    reports = dry_run(config, hbm_gib=args.hbm_gib, steps=steps, sae_width=args.sae_width)
    for report in reports:
        print(json.dumps(report.to_json()), flush=True)
    too_big = [r for r in reports if not r.fits]
    for r in too_big:
        print(
            f"dry run: step {r.step!r} needs {r.total_bytes / GIB:.4f} GiB per device "
            f"(arguments {r.argument_bytes}, outputs {r.output_bytes}, temporaries {r.temp_bytes} bytes) "
            f"> --hbm_gib={args.hbm_gib}",
            file=sys.stderr,
        )
    return 1 if too_big else 0


if __name__ == "__main__":
    sys.exit(main())
