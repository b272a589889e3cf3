"""Hugging Face safetensors checkpoints <-> sharded NNX parameters.

Tensors are memory-mapped and each device reads only its own shard (mapped
back through the reshape/transpose between the Hugging Face layout and ours),
so a 27B checkpoint never sits whole in one host's memory. We parse the
safetensors header ourselves because the `safetensors` numpy backend cannot
represent bfloat16, the dtype most checkpoints are stored in.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from emjax.artifacts import write_safetensors  # noqa: F401  (re-exported: the one safetensors writer)

DTYPES = {
    "BF16": ml_dtypes.bfloat16,
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
    "I8": np.int8,
    "U8": np.uint8,
    "I16": np.int16,
    "I32": np.int32,
    "I64": np.int64,
    "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}


# The 16 values of an FP4 (E2M1) code; bit 3 is the sign.
FP4_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32
)


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be read as asked."""


class SafetensorsFile:
    """Zero-copy access to the tensors of one .safetensors file.

    The header is checked against the file when it is opened: a truncated or
    inconsistent file is refused then, naming the tensor, not when a memory map
    of it fails later.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                header_len = int.from_bytes(f.read(8), "little")
                # Checked before reading: a corrupt length would otherwise allocate that many bytes.
                fits = size >= 8 and header_len <= size - 8
                header = json.loads(f.read(header_len)) if fits else None
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.path}: not a readable safetensors file ({e})") from e
        if not fits:
            raise CheckpointError(
                f"{self.path}: a header of {header_len} bytes does not fit in a file of {size} bytes "
                "(truncated, or not a safetensors file)"
            )
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: the safetensors header is not a JSON object")
        header.pop("__metadata__", None)
        self.tensors: dict[str, dict] = header
        self.data_offset = 8 + header_len
        for key, info in header.items():
            self._check(key, info, size - self.data_offset)

    def _check(self, key: str, info, data_size: int) -> None:
        """Refuse a tensor entry whose dtype, shape and offsets do not agree with each other and the file."""
        where = f"{self.path}: tensor {key!r}"
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{where} has no valid dtype, shape and data_offsets: {info!r:.120}") from None
        counts = [*shape, start, end] if isinstance(shape, list) else [None]
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts):
            raise CheckpointError(f"{where} has an invalid shape {shape!r} or data_offsets {[start, end]!r}")
        if not start <= end <= data_size:
            raise CheckpointError(
                f"{where} lies at bytes [{start}, {end}) of the data, but the file holds only {data_size} "
                "bytes of data (truncated?)"
            )
        nbytes = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize if dtype in DTYPES else end - start
        if end - start != nbytes:
            raise CheckpointError(
                f"{where} of dtype {dtype} and shape {tuple(shape)} needs {nbytes} bytes, "
                f"but its data_offsets span {end - start}"
            )

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key]["shape"])

    def array(self, key: str) -> np.ndarray:
        """A read-only memory map of the tensor: slicing it reads only those bytes."""
        info = self.tensors[key]
        if info["dtype"] not in DTYPES:
            raise CheckpointError(f"{self.path}: tensor {key!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end == start:
            return np.zeros(shape, DTYPES[info["dtype"]])
        return np.memmap(self.path, dtype=DTYPES[info["dtype"]], mode="r", offset=self.data_offset + start, shape=shape)


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """MXFP4 -> fp32: blocks [..., G, 16] uint8 (two codes a byte, low nibble first),
    scales [..., G] uint8 biased exponents shared by each group of 32; returns [..., G * 32]."""
    blocks = np.asarray(blocks, np.uint8)
    codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], 32)
    exponents = np.asarray(scales, np.int32)[..., None] - 127
    with np.errstate(over="ignore"):  # an exponent of 128 overflows to inf, as in the reference
        values = np.ldexp(FP4_VALUES[codes], exponents)
    return values.reshape(*blocks.shape[:-2], blocks.shape[-2] * 32)


class MXFP4Tensor:
    """A dequantised view of `<name>_blocks` + `<name>_scales`, read block by block.

    Shaped like the dense Hugging Face parameter, [E, G * 32, rows] (the
    stored [E, rows, G, 16] dequantised, then its last two dimensions swapped),
    so an HFTensor reads it like any other source; a slice dequantises only
    the groups it touches.
    """

    def __init__(self, blocks: np.ndarray, scales: np.ndarray, name: str):
        if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
            raise CheckpointError(f"{name}: MXFP4 blocks {blocks.shape} and scales {scales.shape} do not match")
        self.blocks, self.scales = blocks, scales
        e, rows, groups, _ = blocks.shape
        self.shape = (e, groups * 32, rows)

    def __getitem__(self, index: tuple[slice, slice, slice]) -> np.ndarray:
        experts, columns, rows = index
        lo, hi = columns.indices(self.shape[1])[:2]
        first, last = lo // 32, -(-hi // 32)
        values = dequantize_mxfp4(self.blocks[experts, rows, first:last], self.scales[experts, rows, first:last])
        return values[..., lo - first * 32 : hi - first * 32].swapaxes(1, 2)


class Checkpoint:
    """A Hugging Face checkpoint directory: config.json and its safetensors files."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint directory {self.path} does not exist")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{config_path} is missing: a Hugging Face checkpoint needs its config.json")
        try:
            self.config = json.loads(config_path.read_text())
        except ValueError as e:
            raise CheckpointError(f"{config_path}: invalid JSON ({e})") from e
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{config_path}: expected a JSON object, got {type(self.config).__name__}")
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        index_path = self.path / "model.safetensors.index.json"
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_path}: not a safetensors index with a 'weight_map' ({e!r})") from e
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise CheckpointError(f"{index_path}: 'weight_map' must map tensor names to file names")
            for key, filename in weight_map.items():
                self.where[key] = filename
            names = sorted(set(weight_map.values()))
        else:
            names = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not names:
                raise CheckpointError(
                    f"{self.path} holds no model.safetensors or model.safetensors.index.json "
                    "(emjax reads safetensors only, never pickled .bin files)"
                )
        for name in names:
            if not (self.path / name).is_file():
                raise CheckpointError(f"{self.path / name} is listed in model.safetensors.index.json but missing")
            self.files[name] = SafetensorsFile(self.path / name)
        for name, f in self.files.items():
            for key in f.tensors:
                self.where.setdefault(key, name)

    def has(self, key: str) -> bool:
        return key in self.where

    def file(self, key: str) -> SafetensorsFile:
        if key not in self.where:
            raise CheckpointError(f"{self.path}: tensor {key!r} not found in {sorted(self.files)}")
        return self.files[self.where[key]]


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """Where one of our parameters lives in a Hugging Face checkpoint, and its layout.

    Our array = transpose(reshape(hf_tensor, split), perm): `split` gives, for
    each Hugging Face dimension, the sizes it splits into (e.g. q_proj rows
    [heads * head_dim] -> (heads, head_dim)); None keeps the dimensions as they are.
    """

    key: str
    split: tuple[tuple[int, ...], ...] | None = None
    perm: tuple[int, ...] | None = None

    def groups(self, hf_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        groups = self.split or tuple((n,) for n in hf_shape)
        if tuple(math.prod(g) for g in groups) != tuple(hf_shape):
            raise CheckpointError(
                f"tensor {self.key!r} has shape {hf_shape}, expected {tuple(math.prod(g) for g in groups)}"
            )
        return groups

    def our_shape(self, hf_shape: tuple[int, ...]) -> tuple[int, ...]:
        flat = tuple(n for g in self.groups(hf_shape) for n in g)
        return tuple(flat[p] for p in self.perm) if self.perm else flat

    def read(self, source: np.ndarray, index: tuple[slice, ...]) -> np.ndarray:
        """The block `index` (slices in our layout) read from the HF array `source`.

        Each HF dimension reads the contiguous range covering the block of its
        leading split dimension; the inner split dimensions are sliced after.
        """
        groups = self.groups(source.shape)
        flat = [n for g in groups for n in g]
        perm = self.perm or tuple(range(len(flat)))
        bounds = [None] * len(flat)  # (lo, hi) of the block in the split, untransposed layout
        for axis, p in enumerate(perm):
            bounds[p] = index[axis].indices(flat[p])[:2]
        hf_index, block_shape, inner, dim = [], [], [], 0
        for g in groups:
            lo, hi = bounds[dim]
            stride = math.prod(g[1:])
            hf_index.append(slice(lo * stride, hi * stride))
            block_shape += [hi - lo, *g[1:]]
            inner += [slice(None), *(slice(*bounds[d]) for d in range(dim + 1, dim + len(g)))]
            dim += len(g)
        block = np.asarray(source[tuple(hf_index)]).reshape(block_shape)[tuple(inner)]
        return block.transpose(perm)

    def tensors(self, array: np.ndarray) -> dict[str, np.ndarray]:
        """Our array as the Hugging Face tensor(s) it is saved as."""
        return {self.key: self.write(array)}

    def write(self, array: np.ndarray) -> np.ndarray:
        """Our array back in the Hugging Face layout."""
        if self.perm:
            array = array.transpose(np.argsort(self.perm))
        if self.split:
            array = array.reshape([math.prod(g) for g in self.split])
        return array


@dataclasses.dataclass(frozen=True)
class StackedTensor:
    """One stacked parameter of emjax.models.decoder.LayerStack: `parts[g]` is where layer group g's
    slice (our axis 0) lives in the checkpoint, each read like the HFTensor it is."""

    parts: tuple[HFTensor, ...]

    @property
    def key(self) -> str:
        return self.parts[0].key

    def tensors(self, array: np.ndarray) -> dict[str, np.ndarray]:
        """Our stacked array back as the Hugging Face tensors of its layers."""
        return {part.key: part.write(array[g]) for g, part in enumerate(self.parts)}


def stack_layers(table: Mapping[str, HFTensor], num_layers: int, period: int) -> dict:
    """A table keyed per layer ("blocks.{i}.attn.q") regrouped as the LayerStack holds it:
    "blocks.layers.{i % period}.attn.q" -> StackedTensor of layers i % period, i % period + period, ..."""
    out, per_layer = {}, {}
    for path, spec in table.items():
        head, _, rest = path.partition(".")
        if head != "blocks":
            out[path] = spec
            continue
        layer, _, name = rest.partition(".")
        per_layer[(int(layer), name)] = spec
    names = sorted({name for _, name in per_layer})
    for j in range(period):
        for name in names:
            parts = tuple(per_layer[(i, name)] for i in range(j, num_layers, period) if (i, name) in per_layer)
            if parts:
                out[f"blocks.layers.{j}.{name}"] = StackedTensor(parts)
    return out


def attention_tensors(prefix: str, ours: str, cfg, *, bias: bool) -> dict[str, HFTensor]:
    """q/k/v/o projections (and biases) of one layer in the layout every family shares.

    HF stores q_proj as [heads * head_dim, d]; ours is [d, heads, head_dim].
    """
    h, g, k, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size

    def heads_in(name: str, n: int) -> HFTensor:  # [n*k, d] -> [d, n, k]
        return HFTensor(f"{prefix}self_attn.{name}_proj.weight", split=((n, k), (d,)), perm=(2, 0, 1))

    table = {
        ours + "attn.q": heads_in("q", h),
        ours + "attn.k": heads_in("k", g),
        ours + "attn.v": heads_in("v", g),
        ours + "attn.o": HFTensor(f"{prefix}self_attn.o_proj.weight", split=((d,), (h, k)), perm=(1, 2, 0)),
    }
    if bias:
        table |= {
            ours + "attn.q_bias": HFTensor(f"{prefix}self_attn.q_proj.bias", split=((h, k),)),
            ours + "attn.k_bias": HFTensor(f"{prefix}self_attn.k_proj.bias", split=((g, k),)),
            ours + "attn.v_bias": HFTensor(f"{prefix}self_attn.v_proj.bias", split=((g, k),)),
            ours + "attn.o_bias": HFTensor(f"{prefix}self_attn.o_proj.bias"),
        }
    return table


def gated_mlp_tensors(prefix: str, ours: str) -> dict[str, HFTensor]:
    """gate/up/down projections of one layer's gated MLP (layers.GatedMLP); HF stores each as [out, in]."""
    return {
        ours + f"mlp.{name}": HFTensor(f"{prefix}mlp.{name}_proj.weight", perm=(1, 0))
        for name in ("gate", "up", "down")
    }


def outer_tensors(cfg) -> dict[str, HFTensor]:
    """Embedding, final norm and (untied) head, named alike in every family."""
    table = {"embed": HFTensor("model.embed_tokens.weight"), "final_norm.weight": HFTensor("model.norm.weight")}
    if not cfg.tie_word_embeddings:
        table["head"] = HFTensor("lm_head.weight", perm=(1, 0))
    return table


def load_params(ckpt: Checkpoint, table: Mapping[str, HFTensor | StackedTensor], abstract, shardings, dtype):
    """Read each parameter of `abstract` (flat path -> ShapeDtypeStruct) straight into its shards.

    A stacked parameter (StackedTensor) is assembled per device: each device reads
    its shard of every layer it stacks, never a whole layer it does not hold.
    Returns the arrays (flat path -> jax.Array) and the checkpoint keys read.
    """
    arrays, used = {}, set()
    for path, target in abstract.items():
        if path not in table:
            raise CheckpointError(f"no checkpoint mapping for parameter {path!r}")
        spec = table[path]
        parts = spec.parts if isinstance(spec, StackedTensor) else (spec,)
        sources, shape, where = [], None, None
        for part in parts:
            source, part_shape, where = _source(ckpt, part, used)
            if shape is not None and part_shape != shape:
                raise CheckpointError(
                    f"{ckpt.path}: tensor {part.key!r} gives {part_shape} for {path!r}, "
                    f"but {parts[0].key!r} gives {shape}"
                )
            sources.append(source)
            shape = part_shape
        if isinstance(spec, StackedTensor):
            shape = (len(parts), *shape)
        if shape != tuple(target.shape):
            raise CheckpointError(
                f"{where}: tensor {parts[-1].key!r} has shape {sources[-1].shape}, which gives {shape} for "
                f"{path!r}, but config.json implies {tuple(target.shape)}"
            )
        if isinstance(spec, StackedTensor):

            def read(index, parts=parts, sources=sources):
                chosen = range(len(parts))[index[0]]
                return np.stack([parts[g].read(sources[g], index[1:]).astype(dtype) for g in chosen])

        else:

            def read(index, spec=spec, source=sources[0]):
                return spec.read(source, index).astype(dtype)

        arrays[path] = jax.make_array_from_callback(shape, shardings[path], read)
    return arrays, used


def _source(ckpt: Checkpoint, spec: HFTensor, used: set) -> tuple:
    """(the array-like holding `spec`, its shape in our layout, the file); the keys it is stored under join `used`."""
    key, source = _open(ckpt, spec.key)
    stored = [key + "_blocks", key + "_scales"] if isinstance(source, MXFP4Tensor) else [key]
    used.update(stored)
    where = ckpt.file(stored[0]).path
    try:
        return source, spec.our_shape(source.shape), where
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None


def _open(ckpt: Checkpoint, key: str):
    """(the key found, its array): stored as is, under another prefix, or as MXFP4 blocks + scales."""
    if not ckpt.has(key) and ckpt.has(key + "_blocks"):
        blocks, scales = key + "_blocks", key + "_scales"
        return key, MXFP4Tensor(ckpt.file(blocks).array(blocks), ckpt.file(scales).array(scales), key)
    key = key if ckpt.has(key) else _with_prefix(ckpt, key)
    return key, ckpt.file(key).array(key)


def _with_prefix(ckpt: Checkpoint, key: str) -> str:
    """Find `key` under another prefix (e.g. 'language_model.' or without 'model.')."""
    bare = key.removeprefix("model.")
    matches = [k for k in ckpt.where if k.endswith(bare) and (k == bare or k.endswith("." + bare))]
    if len(matches) != 1:
        raise CheckpointError(f"{ckpt.path}: tensor {key!r} not found (files: {sorted(ckpt.files)})")
    return matches[0]
