"""Model families, Hugging Face checkpoints and the forward API.

model = emjax.models.load("/ckpt/gemma-2-2b", dtype="bfloat16", mesh=mesh)
out = model(tokens, attention_mask=mask, capture=(12,), stop_at_layer=13)
out.captured[12]  # == transformers hidden_states[13]
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding

from emjax import artifacts, distributed
from emjax.artifacts import write_safetensors
from emjax.models import gemma2, gpt_oss, hf_config, layers, llama
from emjax.models.checkpoint import Checkpoint, CheckpointError, HFTensor, load_params

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Family:
    architecture: str
    model_type: str
    config: type
    model: type
    hf_tensors: Callable[[Any], dict[str, HFTensor]]


FAMILIES = (
    Family(gemma2.ARCHITECTURE, gemma2.MODEL_TYPE, gemma2.Gemma2Config, gemma2.Gemma2, gemma2.hf_tensors),
    Family(llama.ARCHITECTURE, llama.MODEL_TYPE, llama.LlamaConfig, llama.Llama, llama.hf_tensors),
    Family(gpt_oss.ARCHITECTURE, gpt_oss.MODEL_TYPE, gpt_oss.GptOssConfig, gpt_oss.GptOss, gpt_oss.hf_tensors),
)


def family_of(hf: Mapping[str, Any], source: str = "config.json") -> Family:
    architectures = list(hf.get("architectures") or [])
    for family in FAMILIES:
        if family.architecture in architectures or (not architectures and hf.get("model_type") == family.model_type):
            return family
    known = ", ".join(f.architecture for f in FAMILIES)
    raise CheckpointError(
        f"{source}: unknown architecture {architectures or hf.get('model_type')!r}; emjax supports {known}"
    )


def default_dtype():
    """fp32 on CPU (tests, parity), bf16 on accelerators."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def _flat(state) -> dict[str, nnx.Variable]:
    return {".".join(map(str, path)): var for path, var in nnx.to_flat_state(state)}


def param_shardings(state, mesh: Mesh, rules=None) -> dict[str, NamedSharding]:
    """Flat path -> NamedSharding from each parameter's logical axes."""
    out = {}
    for path, var in _flat(state).items():
        axes = var.get_metadata().get("logical_axes")
        if axes is None:
            raise ValueError(f"parameter {path!r} carries no logical axes")
        out[path] = distributed.named_sharding(axes, var.shape, mesh, rules, what=f"parameter {path!r}")
    return out


def _abstract(family: Family, cfg, dtype, mesh, rules):
    sharder = layers.Sharder(mesh, rules) if mesh is not None else layers.no_sharding()
    make = lambda seed: family.model(cfg, dtype=dtype, rngs=nnx.Rngs(seed), sharder=sharder)  # noqa: E731
    return make, nnx.eval_shape(lambda: make(0))


def parameter_count(config) -> int:
    """Parameters of the model a transformers-style config describes (abstract: nothing is allocated)."""
    hf = hf_config.to_dict(config)
    family = family_of(hf, source="config")
    _, abstract = _abstract(family, family.config.from_hf(hf, source="config"), jnp.float32, None, None)
    return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def build(config, *, seed: int = 0, dtype=None, mesh: Mesh | None = None, rules=None):
    """A randomly initialised model from a transformers-style config (dict or PretrainedConfig).

    With a mesh, each parameter is created directly in its shards.
    """
    hf = hf_config.to_dict(config)
    family = family_of(hf, source="config")
    cfg = family.config.from_hf(hf, source="config")
    dtype = layers.dtype_of(dtype or default_dtype())
    mesh = None if mesh is None else distributed.auto_mesh(mesh)
    make, abstract = _abstract(family, cfg, dtype, mesh, rules)
    if mesh is None:
        return make(seed)
    graphdef, abstract_state = nnx.split(abstract)
    flat_shardings = param_shardings(abstract_state, mesh, rules)
    shardings = nnx.from_flat_state({tuple(_split_path(p)): s for p, s in flat_shardings.items()})
    state = jax.jit(lambda: nnx.state(make(seed)), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def _split_path(path: str):
    return [int(p) if p.isdigit() else p for p in path.split(".")]


def _is_gguf(path: str | os.PathLike) -> bool:
    """A path naming a GGUF file (gguf.is_gguf's rule), checked without importing the gguf package,
    which only GGUF files need: checkpoint directories load on hosts without it."""
    return Path(path).suffix.lower() == ".gguf"


def load(path: str | os.PathLike, *, dtype=None, mesh: Mesh | None = None, rules=None):
    """A model from a Hugging Face checkpoint directory or a .gguf file, each tensor read straight into its shards."""
    if _is_gguf(path):
        from emjax.models import gguf  # here, so that `python -m emjax.models.gguf` runs it fresh

        ckpt = gguf.GGUFCheckpoint(path)
        source = str(ckpt.path)
    else:
        ckpt = Checkpoint(path)
        source = str(ckpt.path / "config.json")
    family = family_of(ckpt.config, source)
    cfg = family.config.from_hf(ckpt.config, source)
    dtype = layers.dtype_of(dtype or default_dtype())
    mesh = None if mesh is None else distributed.auto_mesh(mesh)
    _, abstract = _abstract(family, cfg, dtype, mesh, rules)
    graphdef, abstract_state = nnx.split(abstract)
    flat = _flat(abstract_state)
    if mesh is None:
        device = SingleDeviceSharding(jax.devices()[0])
        shardings = {p: device for p in flat}
    else:
        shardings = param_shardings(abstract_state, mesh, rules)
    table = family.hf_tensors(cfg)
    arrays, used = load_params(ckpt, table, {p: v.get_value() for p, v in flat.items()}, shardings, np.dtype(dtype))
    unused = set(ckpt.where) - used - {"lm_head.weight"}  # a tied head may be stored twice
    if unused:
        _log.warning("%s: %d checkpoint tensors were not used, e.g. %s", ckpt.path, len(unused), sorted(unused)[:5])
    for p, var in flat.items():
        var.set_value(arrays[p])
    return nnx.merge(graphdef, abstract_state)


def save(model, path: str | os.PathLike) -> None:
    """Write `model` as a Hugging Face checkpoint directory (config.json + model.safetensors)."""
    family = next(f for f in FAMILIES if isinstance(model, f.model))
    table = family.hf_tensors(model.config)
    tensors = {}
    for p, var in _flat(nnx.state(model, nnx.Param)).items():
        tensors |= table[p].tensors(distributed.gather_to_host(var.get_value()))
    if not distributed.is_main_process():
        return
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config.to_hf() | {"torch_dtype": str(model.dtype), "dtype": str(model.dtype)}
    write_safetensors(path / "model.safetensors", tensors, metadata={"format": "pt"})
    artifacts.write_json(path / "config.json", config)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(path: str | os.PathLike):
    """The Hugging Face tokenizer saved in `path`, or stored in a .gguf file (local files only, no remote code)."""
    from transformers import AutoTokenizer

    if _is_gguf(path):
        from emjax.models import gguf

        return gguf.load_tokenizer(path)
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"directory {path} does not exist (the tokenizer is read from it)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: the tokenizer cannot be loaded ({first_line})") from e


def jit_forward(
    model,
    *,
    capture: Sequence[int] = (),
    stop_at_layer: int | None = None,
    ablate: Mapping[int, jax.Array] | None = None,
):
    """A jitted `f(tokens, attention_mask=None, cache=None) -> Output` over the model's current weights.

    The weights are passed as an argument (not baked into the program); the
    cache is donated, so decode with `out = f(tok, cache=out.cache)`. `ablate`
    ({layer: orthonormal Q [k, d_model]}, see DecoderLM) is passed the same way.
    """
    graphdef, state = nnx.split(model)
    capture = tuple(sorted(set(capture)))
    ablate = None if not ablate else {int(layer): jnp.asarray(q) for layer, q in ablate.items()}

    def forward(state, tokens, attention_mask, cache, ablate):
        return nnx.merge(graphdef, state)(
            tokens,
            attention_mask=attention_mask,
            capture=capture,
            stop_at_layer=stop_at_layer,
            cache=cache,
            ablate=ablate,
        )

    # The CPU backend cannot reuse donated buffers and would warn on every call.
    forward = jax.jit(forward, donate_argnums=() if jax.default_backend() == "cpu" else 3)

    # Inputs placed on a jax.make_mesh (Explicit-axis) mesh, or a jax.set_mesh context
    # of one, would meet the model's Auto-axis sharding constraints: both are made Auto.
    mesh = model.shard.mesh

    def call(tokens, attention_mask=None, cache=None):
        inputs = distributed.on_auto_mesh((tokens, attention_mask, cache))
        with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
            return forward(state, *inputs, ablate)

    return call


__all__ = ["FAMILIES", "build", "jit_forward", "load", "load_tokenizer", "param_shardings", "parameter_count", "save"]
