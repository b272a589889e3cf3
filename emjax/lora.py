"""LoRA adapters on a model's projections, and the Hugging Face PEFT format.

    model = emjax.models.load(ckpt)
    emjax.lora.attach(model, LoRAConfig(rank=32, alpha=64))  # B = 0: same outputs
    ... train (emjax.train) ...
    emjax.lora.save_peft(model, "adapter/")    # peft.PeftModel.from_pretrained(base, "adapter/")
    emjax.lora.load_peft(model, "adapter/")    # and back
    emjax.lora.merge(model)                    # W += scale * A @ B, adapters removed

A weight W of shape [*in, *out] (q: [embed, heads, head_dim], o: [heads,
head_dim, embed], MLP: [embed, mlp] ...) gets A [*in, r] and B [r, *out]; the
projection becomes x W + scale * dropout(x) A B with scale alpha / r (rsLoRA:
alpha / sqrt(r)), as PEFT computes it. A starts as PEFT's (uniform in
+-1/sqrt(fan_in)), B at zero. Adapter parameters are `LoRAParam`s, a variable
type of their own, so base-weight filters (nnx.Param) never include them and
training differentiates and optimises them alone.

PEFT stores lora_A.weight as [r, fan_in] and lora_B.weight as [fan_out, r] with
the fan dimensions in Hugging Face order, which is our order flattened.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from emjax import artifacts, distributed
from emjax.artifacts import write_safetensors
from emjax.config import LoRAConfig
from emjax.models.checkpoint import CheckpointError, SafetensorsFile
from emjax.models.layers import HF_MODULES, LORA_SITES
from emjax.precision import matmul_precision

F32 = jnp.float32
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# PEFT module name -> (submodule of a block, our weight name, leading input dimensions of the weight),
# declared next to the projections it names, in emjax.models.layers.
SITES = LORA_SITES
HF_PARENT = HF_MODULES


class LoRAParam(nnx.Variable):
    """A LoRA factor: trained, while nnx.Param (the base weights) stays frozen."""


class DropoutKey(nnx.Variable):
    """The PRNG keys of one adapter's dropout (one per layer), set for a training step by set_dropout_keys."""


class LayerMask(nnx.Variable):
    """1 for the layers of a stack that carry the adapter, 0 for those that do not (PEFT's layers_to_transform)."""


class LoRA(nnx.Module):
    """scale * dropout(x) @ A @ B on every layer of a stacked weight [layers, *in, *out] (in_ndim input dims).

    The model's blocks are stacked (emjax.models.decoder.LayerStack), so are the
    adapters: A [layers, *in, r], B [layers, r, *out]. The layer scan hands the
    block one layer's slice, and __call__ sees A [*in, r] and B [r, *out]. When
    only some layers are adapted, `mask` zeroes the others' output (their factors
    exist, stay out of every saved adapter, and get zero gradients).
    """

    def __init__(self, weight: nnx.Variable, in_ndim: int, rank: int, scale: float, dropout: float, keys, mask=None):
        shape, axes = weight.shape[1:], weight.get_metadata()["logical_axes"][1:]
        fan_in = math.prod(shape[:in_ndim])
        bound = fan_in**-0.5
        a = jax.vmap(lambda key: jax.random.uniform(key, (*shape[:in_ndim], rank), F32, -bound, bound))(keys)
        self.a = LoRAParam(a, logical_axes=("layers", *axes[:in_ndim], "lora"))
        b = jnp.zeros((len(a), rank, *shape[in_ndim:]), F32)
        self.b = LoRAParam(b, logical_axes=("layers", "lora", *axes[in_ndim:]))
        self.mask = None if mask is None else LayerMask(jnp.asarray(mask, F32), logical_axes=("layers",))
        self.adapted = tuple(bool(m) for m in (np.ones(a.shape[0]) if mask is None else mask))  # static twin of mask
        self.in_ndim, self.scale, self.dropout = in_ndim, float(scale), float(dropout)
        self.dropout_key = nnx.data(None)  # set only inside a training step

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    @property
    def num_layers(self) -> int:
        """Layers of the stack (the leading axis of the factors held here)."""
        return self.a.shape[0]

    def __call__(self, x: jax.Array) -> jax.Array:
        """One layer's adapter output (inside the layer scan, where the factors are that layer's slices)."""
        if self.dropout > 0 and self.dropout_key is not None:
            keep = jax.random.bernoulli(self.dropout_key[...], 1 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1 - self.dropout), 0).astype(x.dtype)
        # As plain 2-D matmuls over the flattened tokens: [N, fan_in] @ [fan_in, r] @ [r, fan_out].
        lead, fan_in = x.shape[: x.ndim - self.in_ndim], math.prod(x.shape[x.ndim - self.in_ndim :])
        a = self.a[...].astype(x.dtype).reshape(fan_in, self.rank)
        b = self.b[...].astype(x.dtype).reshape(self.rank, -1)
        precision = matmul_precision(x.dtype)
        down = jnp.matmul(x.reshape(-1, fan_in), a, precision=precision)
        out = jnp.matmul(down, b, precision=precision) * jnp.asarray(self.scale, x.dtype)
        if self.mask is not None:
            out = out * self.mask[...].astype(x.dtype)
        return out.reshape(*lead, *self.b.shape[1:])

    def delta(self) -> jax.Array:
        """scale * A @ B per layer, stacked like the weight [layers, *in, *out] (fp32; 0 on masked layers)."""
        a, b = self.a[...], self.b[...]
        n = a.shape[0]
        flat = jnp.matmul(a.reshape(n, -1, self.rank), b.reshape(n, self.rank, -1), precision=matmul_precision(F32))
        flat = flat * self.scale
        if self.mask is not None:
            flat = flat * self.mask[...][:, None, None]
        return flat.reshape(n, *a.shape[1:-1], *b.shape[2:])


class LayerSlice:
    """Layer `group` of a stacked variable, read and written as if it were that layer's own variable."""

    def __init__(self, var: nnx.Variable, group: int):
        self.var, self.group = var, group

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.var.shape[1:])

    @property
    def dtype(self):
        return self.var.dtype

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def sharding(self):
        return self.get_value().sharding

    def get_value(self) -> jax.Array:
        return self.var.get_value()[self.group]

    def __getitem__(self, index):
        return self.get_value()[index]

    def set_value(self, value) -> None:
        stacked = self.var.get_value()
        self.var.set_value(stacked.at[self.group].set(jnp.asarray(value, stacked.dtype)))


class LayerAdapter:
    """One layer's adapter, as PEFT sees it: `a` [*in, r] and `b` [r, *out] (LayerSlices of the stack's factors)."""

    def __init__(self, adapter: LoRA, group: int):
        self.stacked, self.group = adapter, group
        self.a, self.b = LayerSlice(adapter.a, group), LayerSlice(adapter.b, group)
        self.scale, self.dropout, self.in_ndim = adapter.scale, adapter.dropout, adapter.in_ndim

    @property
    def rank(self) -> int:
        return self.stacked.rank

    def delta(self) -> jax.Array:
        """scale * A @ B in this layer's weight shape (fp32)."""
        a, b = self.a.get_value(), self.b.get_value()
        return jnp.tensordot(a, b, axes=1, precision=matmul_precision(F32)) * self.scale


def scale_of(config: LoRAConfig) -> float:
    return config.alpha / (math.sqrt(config.rank) if config.rslora else config.rank)


def _check(model, config: LoRAConfig) -> list[int]:
    unknown = sorted(set(config.targets) - set(SITES))
    if unknown:
        raise ValueError(f"lora.targets: unknown modules {unknown}; supported: {', '.join(SITES)}")
    if config.rank < 1:
        raise ValueError(f"lora.rank must be >= 1, got {config.rank}")
    if not 0 <= config.dropout < 1:
        raise ValueError(f"lora.dropout must be in [0, 1), got {config.dropout}")
    num_layers = len(model.blocks)
    layers = list(range(num_layers)) if config.layers is None else sorted(set(config.layers))
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"lora.layers {bad} are outside 0..{num_layers - 1}")
    for peft_name in config.targets:
        parent, weight, _ = SITES[peft_name]
        if not hasattr(getattr(model.blocks.layers[0], parent, None), weight):
            raise ValueError(
                f"lora.targets: {type(model).__name__} has no dense {peft_name} "
                f"(gpt-oss experts are not adaptable yet; target the attention projections)"
            )
    return layers


def attach(model, config: LoRAConfig, *, seed: int = 0, mesh: Mesh | None = None, rules=None):
    """Add adapters (B = 0, so outputs are unchanged) to `config.targets` in `config.layers`; returns model.

    Layer i's A is drawn from fold_in(fold_in(key(seed), i), target index), whatever the stacking.
    """
    layers = set(_check(model, config))
    if next(adapters(model), None) is not None:
        raise ValueError("the model already has LoRA adapters; merge() or remove() them first")
    key = jax.random.key(seed)
    scale = scale_of(config)
    stack = model.blocks
    for position, block in enumerate(stack.layers):
        numbers = [group * stack.period + position for group in range(stack.num_groups)]
        adapted = [i in layers for i in numbers]
        if not any(adapted):
            continue
        for peft_name in config.targets:
            parent_name, weight_name, in_ndim = SITES[peft_name]
            parent = getattr(block, parent_name)
            if getattr(parent, "lora", None) is None:
                parent.lora = nnx.Dict()
            site = list(SITES).index(peft_name)
            keys = jnp.stack([jax.random.fold_in(jax.random.fold_in(key, i), site) for i in numbers])
            parent.lora[weight_name] = LoRA(
                getattr(parent, weight_name), in_ndim, config.rank, scale, config.dropout, keys,
                mask=None if all(adapted) else adapted,
            )  # fmt: skip
    if mesh is not None:
        place_on_mesh(model, mesh, rules)
    return model


def place_on_mesh(model, mesh: Mesh, rules=None) -> None:
    """Lay each adapter's factors (and layer mask) out on the mesh by their logical axes."""
    for *_, adapter in stacked_adapters(model):
        for var in (adapter.a, adapter.b, adapter.mask):
            if var is None:
                continue
            sharding = distributed.named_sharding(var.get_metadata()["logical_axes"], var.shape, mesh, rules)
            var.set_value(jax.device_put(var.get_value(), sharding))


def stacked_adapters(model) -> Iterator[tuple[int, str, str, LoRA]]:
    """(position in the layer group, block attribute, weight name, stacked adapter) of every adapted weight,
    whose nnx path is ("blocks", "layers", position, attribute, weight)."""
    for position, block in enumerate(model.blocks.layers):
        for parent_name, weight_name, _ in SITES.values():
            found = getattr(getattr(block, parent_name, None), "lora", None)
            if found is not None and weight_name in found:
                yield position, parent_name, weight_name, found[weight_name]


def adapters(model) -> Iterator[tuple[str, LayerAdapter]]:
    """(PEFT module name, that layer's adapter), e.g. ("model.layers.3.self_attn.q_proj", LayerAdapter),
    in layer order."""
    stack = model.blocks
    found = {}
    for position, parent_name, weight_name, adapter in stacked_adapters(model):
        peft_name = next(n for n, (p, w, _) in SITES.items() if (p, w) == (parent_name, weight_name))
        for group in range(stack.num_groups):
            if adapter.adapted[group]:
                layer = group * stack.period + position
                found[(layer, list(SITES).index(peft_name))] = (
                    f"model.layers.{layer}.{HF_PARENT[parent_name]}.{peft_name}",
                    LayerAdapter(adapter, group),
                )
    for key in sorted(found):
        yield found[key]


def _parents(model):
    for block in model.blocks.layers:
        for name in HF_PARENT:
            parent = getattr(block, name, None)
            if getattr(parent, "lora", None) is not None:
                yield parent


def remove(model):
    """Drop every adapter; returns model."""
    for parent in _parents(model):
        del parent.lora
    return model


def merge(model):
    """Fold each adapter into its weight (W += scale * A @ B, in W's dtype) and remove it; returns model."""
    for parent in _parents(model):
        for weight_name, adapter in parent.lora.items():
            weight = getattr(parent, weight_name)
            merged = weight.get_value().astype(F32) + adapter.delta()
            weight.set_value(merged.astype(weight.dtype))
        del parent.lora
    return model


def set_dropout_keys(model, key) -> None:
    """Give every adapter's every layer its own dropout key for one step (None: no dropout, as at evaluation)."""
    for index, (*_, adapter) in enumerate(stacked_adapters(model)):
        if adapter.dropout > 0:
            if key is None:
                adapter.dropout_key = None
            else:
                site = jax.random.fold_in(key, index)
                layers = jnp.arange(adapter.num_layers)
                adapter.dropout_key = DropoutKey(jax.vmap(lambda i, site=site: jax.random.fold_in(site, i))(layers))


def config_of(model) -> LoRAConfig:
    """The LoRAConfig that describes the attached adapters (uniform rank and scale)."""
    found = list(adapters(model))
    if not found:
        raise ValueError("the model has no LoRA adapters")
    ranks = {a.rank for _, a in found}
    scales = {a.scale for _, a in found}
    if len(ranks) > 1 or len(scales) > 1:
        raise ValueError(f"adapters with mixed ranks {sorted(ranks)} or scales {sorted(scales)}")
    rank, scale = ranks.pop(), scales.pop()
    layers = sorted({int(name.split(".")[2]) for name, _ in found})
    targets = tuple(t for t in SITES if any(name.endswith("." + t) for name, _ in found))
    # Report the scale as alpha for the plain convention: exact for both, since PEFT multiplies back.
    return LoRAConfig(
        rank=rank,
        alpha=scale * rank,
        dropout=found[0][1].dropout,
        rslora=False,
        targets=targets,
        layers=None if layers == list(range(len(model.blocks))) else tuple(layers),
    )


# ---------------------------------------------------------------------------- PEFT format


def _to_host(value) -> np.ndarray:
    return distributed.gather_to_host(value).astype(np.float32)


def save_peft(model, path: str | os.PathLike, *, config: LoRAConfig | None = None, base_model: str | None = None):
    """Write the adapters as a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors, fp32).

    `config` (what the adapters were attached with) keeps alpha and rsLoRA as given;
    without it the scale is written as alpha = scale * rank with rsLoRA off.
    """
    config = config or config_of(model)
    tensors = {}
    for name, adapter in adapters(model):
        a, b = _to_host(adapter.a.get_value()), _to_host(adapter.b.get_value())
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.reshape(-1, adapter.rank).T.copy()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.reshape(adapter.rank, -1).T.copy()
    if not tensors:
        raise ValueError("the model has no LoRA adapters to save")
    if not distributed.is_main_process():
        return
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / ADAPTER_WEIGHTS, tensors, metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.rslora,
        "target_modules": sorted(config.targets),
        "layers_to_transform": None if config.layers is None else sorted(config.layers),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }
    artifacts.write_json(path / ADAPTER_CONFIG, adapter_config)


def read_peft_config(path: str | os.PathLike) -> LoRAConfig:
    """The LoRAConfig of a PEFT LoRA directory; features emjax cannot reproduce exactly are refused."""
    source = Path(path) / ADAPTER_CONFIG
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist (not a PEFT adapter directory)")
    try:
        cfg = json.loads(source.read_text())
    except ValueError as e:
        raise CheckpointError(f"{source}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{source}: peft_type {cfg.get('peft_type')!r} is not LORA")
    unsupported = {
        "use_dora": cfg.get("use_dora"),
        "bias": cfg.get("bias", "none") != "none",
        "fan_in_fan_out": cfg.get("fan_in_fan_out"),
        "rank_pattern": cfg.get("rank_pattern"),
        "alpha_pattern": cfg.get("alpha_pattern"),
        "modules_to_save": cfg.get("modules_to_save"),
        "target_parameters": cfg.get("target_parameters"),
        "layers_pattern": cfg.get("layers_pattern"),
    }
    used = [k for k, v in unsupported.items() if v]
    if used:
        raise ValueError(f"{source}: {', '.join(used)} not supported by emjax (plain LoRA on linear projections)")
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        raise ValueError(f"{source}: target_modules is a regex ({targets!r}); emjax needs the list of module names")
    layers = cfg.get("layers_to_transform")
    return LoRAConfig(
        rank=int(cfg["r"]),
        alpha=float(cfg["lora_alpha"]),
        dropout=float(cfg.get("lora_dropout") or 0.0),
        rslora=bool(cfg.get("use_rslora", False)),
        targets=tuple(sorted(targets)),
        layers=None if layers is None else tuple([layers] if isinstance(layers, int) else layers),
    )


def load_peft(model, path: str | os.PathLike, *, mesh: Mesh | None = None, rules=None):
    """Attach the PEFT LoRA adapter in `path` to `model` (which must have none); returns model."""
    path = Path(path)
    config = read_peft_config(path)
    attach(model, config)
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} does not exist (emjax reads safetensors adapters only, never pickles)")
    file = SafetensorsFile(weights)
    expected = set()
    try:
        for name, adapter in adapters(model):
            for factor, var in (("lora_A", adapter.a), ("lora_B", adapter.b)):
                key = f"base_model.model.{name}.{factor}.weight"
                expected.add(key)
                if key not in file.tensors:
                    raise CheckpointError(f"{weights}: tensor {key!r} is missing")
                # lora_A [r, fan_in] is A [*in, r] flattened and transposed; lora_B [fan_out, r] likewise.
                ours = (
                    (math.prod(var.shape[:-1]), var.shape[-1])
                    if factor == "lora_A"
                    else (var.shape[0], math.prod(var.shape[1:]))
                )
                if file.shape(key) != ours[::-1]:
                    raise ValueError(f"{weights}: {key} has shape {file.shape(key)}, the model needs {ours[::-1]}")
                var.set_value(jnp.asarray(np.asarray(file.array(key), np.float32).T.reshape(var.shape)))
        extra = sorted(set(file.tensors) - expected)
        if extra:
            raise ValueError(f"{weights}: {len(extra)} tensors the adapter config does not explain, e.g. {extra[:3]}")
    except Exception:
        remove(model)  # leave the model as it was given
        raise
    if mesh is not None:
        place_on_mesh(model, mesh, rules)
    return model
