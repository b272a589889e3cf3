"""GGUF files (llama.cpp) as emjax checkpoints: Llama and Gemma-2 families.

`GGUFCheckpoint` offers what the safetensors `Checkpoint` offers to
`load_params` (a Hugging Face config dict, tensors by their Hugging Face key,
each an array-like that reads only the block asked for), so
`emjax.models.load("model.gguf", mesh=mesh)` puts every tensor straight into
its shards: a device dequantises only the rows and quantisation blocks of its
own shard, from the memory-mapped file. Dequantisation is the `gguf`
library's (the reference Python implementation of the ggml formats).

What llama.cpp's converter changed, and we undo:
- tensor names (`blk.N.attn_q.weight`, ...) and config.json fields (metadata
  keys `llama.block_count`, ...), mapped back below;
- Llama q/k rows are permuted from the split-halves RoPE layout into the
  interleaved one (`LlamaModel.permute` in convert_hf_to_gguf.py);
- Gemma-2 norm weights are stored as 1 + w (Gemma multiplies by 1 + w).

Write a Hugging Face directory from a GGUF file:

    python -m emjax.models.gguf convert model.gguf OUT_DIR [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import math
import os
import re
import struct
from pathlib import Path
from typing import Any

import gguf
import ml_dtypes
import numpy as np
from gguf import GGMLQuantizationType as Q

from emjax import artifacts
from emjax.models.checkpoint import CheckpointError

# Every type here is dequantised by `gguf.quants.dequantize` and tested against it.
SUPPORTED_TYPES = (
    Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
)  # fmt: skip

ARCHITECTURES = {"llama": "LlamaForCausalLM", "gemma2": "Gemma2ForCausalLM"}

# GGUF tensor name -> Hugging Face name, per layer and for the whole model.
_MODEL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
}
# `ffn_norm` is the norm before the MLP: Llama calls it post_attention_layernorm, Gemma-2 pre_feedforward.
_FAMILY_BLOCK_TENSORS = {
    "llama": {"ffn_norm": "post_attention_layernorm"},
    "gemma2": {
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
}


def is_gguf(path: str | os.PathLike) -> bool:
    """A path that names a GGUF file (by its suffix, so a missing file still gets a GGUF error)."""
    return Path(path).suffix.lower() == ".gguf"


def hf_name(name: str, architecture: str) -> str | None:
    """The Hugging Face key of GGUF tensor `name`, None when the families here have no such tensor."""
    block = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if block:
        i, kind, suffix = block.groups()
        hf = (_BLOCK_TENSORS | _FAMILY_BLOCK_TENSORS[architecture]).get(kind)
        return f"model.layers.{i}.{hf}.{suffix}" if hf else None
    whole = re.fullmatch(r"(\w+)\.(weight|bias)", name)
    if whole and whole.group(1) in _MODEL_TENSORS:
        return f"{_MODEL_TENSORS[whole.group(1)]}.{whole.group(2)}"
    return None


def unpermute_rows(heads: int, head_dim: int) -> np.ndarray:
    """For each Hugging Face q/k row, the GGUF row that holds it.

    llama.cpp stores each head's rows as (head_dim / 2, 2), interleaving the
    two rotary halves that Hugging Face keeps as (2, head_dim / 2).
    """
    return np.arange(heads * head_dim).reshape(heads, head_dim // 2, 2).swapaxes(1, 2).reshape(-1)


class GGUFTensor:
    """A dequantised view of one GGUF tensor in its Hugging Face layout ([out, in] for weights).

    Indexing with slices dequantises only the rows and quantisation blocks
    the slices touch (a quantised row is a run of blocks along its last
    dimension), from the memory map.
    """

    def __init__(self, name: str, qtype: Q, shape: tuple[int, ...], data: np.ndarray, *, rows=None, add=0.0):
        self.name, self.qtype, self.shape = name, qtype, shape
        self.block_size, self.type_size = gguf.GGML_QUANT_SIZES[qtype]
        self.bytes = data.reshape(math.prod(shape[:-1]), -1)  # still the memory map: nothing read yet
        self.rows, self.add = rows, add

    def __getitem__(self, index) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        index = index + (slice(None),) * (len(self.shape) - len(index))
        if self.rows is not None and len(self.shape) == 1:  # a q/k bias: permuted along its only dimension
            whole = GGUFTensor(self.name, self.qtype, self.shape, self.bytes, add=self.add)[:]
            return whole[self.rows][index]
        *leading, columns = index
        rows = np.arange(math.prod(self.shape[:-1])).reshape(self.shape[:-1])[tuple(leading)]
        row_shape = rows.shape
        rows = rows.reshape(-1)
        if self.rows is not None:
            rows = self.rows[rows]
        lo, hi, step = columns.indices(self.shape[-1])
        first, last = lo // self.block_size, -(-hi // self.block_size)
        raw = self.bytes[rows, first * self.type_size : last * self.type_size]
        values = gguf.quants.dequantize(raw, self.qtype).reshape(len(rows), -1)
        values = values[:, lo - first * self.block_size : hi - first * self.block_size : step]
        values = values.reshape(*row_shape, values.shape[-1]).astype(np.float32, copy=False)
        return values + np.float32(self.add) if self.add else values

    def __array__(self, dtype=None, copy=None):
        whole = self[(slice(None),) * len(self.shape)]
        return whole if dtype is None else whole.astype(dtype)


class StringArray(int):
    """A metadata array of strings (the vocabulary, the merges), skipped by the reader: only its length."""


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def read_header(path: Path) -> tuple[dict[str, Any], list[tuple[str, tuple[int, ...], Q, int]], np.ndarray]:
    """(metadata, [(tensor name, numpy shape, type, byte offset)], the file memory-mapped).

    Our own reader of the GGUF layout (magic, version, counts, key/values,
    tensor table): `gguf.GGUFReader` builds an object per vocabulary string
    and takes ~20 s on a 49k-token vocabulary, which `load` never reads.
    """
    blob = np.memmap(path, dtype=np.uint8, mode="r")
    if bytes(blob[:4]) != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (magic {bytes(blob[:4])!r})")
    version, n_tensors, n_keys = struct.unpack_from("<IQQ", blob, 4)
    if version not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 and 3 are; big-endian is not)")
    pos = 24

    def string(pos):
        (n,) = struct.unpack_from("<Q", blob, pos)
        return bytes(blob[pos + 8 : pos + 8 + n]).decode("utf-8", errors="replace"), pos + 8 + n

    def value(kind, pos):
        if kind == _STRING:
            return string(pos)
        if kind == _ARRAY:
            item, n = struct.unpack_from("<IQ", blob, pos)
            pos += 12
            if item in _SCALARS:
                width = struct.calcsize(_SCALARS[item])
                return np.frombuffer(blob, _SCALARS[item], n, pos).tolist(), pos + n * width
            if item != _STRING:
                raise CheckpointError(f"{path}: metadata arrays of type {item} are not supported")
            for _ in range(n):
                pos += 8 + struct.unpack_from("<Q", blob, pos)[0]
            return StringArray(n), pos
        if kind not in _SCALARS:
            raise CheckpointError(f"{path}: metadata value type {kind} is not a GGUF type")
        return struct.unpack_from(_SCALARS[kind], blob, pos)[0], pos + struct.calcsize(_SCALARS[kind])

    metadata = {}
    for _ in range(n_keys):
        key, pos = string(pos)
        (kind,) = struct.unpack_from("<I", blob, pos)
        metadata[key], pos = value(kind, pos + 4)
    tensors = []
    for _ in range(n_tensors):
        name, pos = string(pos)
        (ndim,) = struct.unpack_from("<I", blob, pos)
        dims = struct.unpack_from(f"<{ndim}Q", blob, pos + 4)
        kind, offset = struct.unpack_from("<IQ", blob, pos + 4 + 8 * ndim)
        pos += 4 + 8 * ndim + 12
        try:
            qtype = Q(kind)
        except ValueError:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown ggml type {kind}") from None
        tensors.append((name, tuple(int(d) for d in reversed(dims)), qtype, offset))  # ggml lists innermost first
    alignment = int(metadata.get("general.alignment", 32))
    data_start = -(-pos // alignment) * alignment
    return metadata, tensors, blob[data_start:]


class GGUFCheckpoint:
    """A GGUF file behind the interface of `checkpoint.Checkpoint`: `config`, `where`, `has`, `file`, `array`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"GGUF file {self.path} does not exist")
        try:
            self.metadata, tensors, self.data = read_header(self.path)
        except (OSError, ValueError, struct.error) as e:
            raise CheckpointError(f"{self.path}: not a readable GGUF file ({e})") from e
        self.architecture = self.field("general.architecture")
        if self.architecture not in ARCHITECTURES:
            raise CheckpointError(
                f"{self.path}: GGUF architecture {self.architecture!r} is not supported "
                f"(emjax reads {', '.join(ARCHITECTURES)})"
            )
        self.tensors = {name: (shape, qtype, offset) for name, shape, qtype, offset in tensors}
        for name, _, qtype, _ in tensors:
            if qtype not in SUPPORTED_TYPES:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} has quantisation type {qtype.name}, which emjax "
                    f"does not dequantise (supported: {', '.join(q.name for q in SUPPORTED_TYPES)})"
                )
        if "rope_freqs.weight" in self.tensors:
            raise CheckpointError(
                f"{self.path}: tensor 'rope_freqs.weight' (Llama-3 RoPE scaling stored as frequency factors) "
                "is not supported; load the model's safetensors checkpoint instead"
            )
        self.config = self._config()
        # Unknown tensors keep their GGUF name, so that `load` reports them as unused.
        self.where = {hf_name(n, self.architecture) or n: n for n in self.tensors}
        self.files = {self.path.name: self}

    def field(self, key: str, default: Any = KeyError) -> Any:
        if key not in self.metadata:
            if default is KeyError:
                raise CheckpointError(f"{self.path}: required metadata key {key!r} is missing")
            return default
        return self.metadata[key]

    def _config(self) -> dict[str, Any]:
        """The config.json fields transformers would read, from the metadata (`{arch}.*` keys)."""
        arch = self.architecture
        get = lambda key, *default: self.field(f"{arch}.{key}", *default)  # noqa: E731
        scaling = get("rope.scaling.type", "none")
        if scaling != "none":
            raise CheckpointError(f"{self.path}: {arch}.rope.scaling.type {scaling!r} is not supported")
        hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
        head_dim = int(get("attention.key_length", hidden // heads))
        tokens = self.field("tokenizer.ggml.tokens", None)
        config = {
            "architectures": [ARCHITECTURES[arch]],
            "model_type": arch,
            "vocab_size": int(get("vocab_size", None) or (tokens if tokens else self._rows("token_embd.weight"))),
            "hidden_size": hidden,
            "intermediate_size": int(get("feed_forward_length")),
            "num_hidden_layers": int(get("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(get("attention.head_count_kv", heads)),
            "head_dim": head_dim,
            "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
            "rope_theta": float(get("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(get("context_length", 8192)),
            "tie_word_embeddings": "output.weight" not in self.tensors,
        }
        for hf, key in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
            token = self.field(f"tokenizer.ggml.{key}_token_id", None)
            if token is not None:
                config[hf] = int(token)
        if arch == "llama":
            rotary = int(get("rope.dimension_count", head_dim))
            if rotary != head_dim:
                raise CheckpointError(f"{self.path}: partial rotary ({rotary} of {head_dim} dimensions) is not Llama")
            config |= {"hidden_act": "silu", "attention_bias": "blk.0.attn_q.bias" in self.tensors}
        else:
            config |= {
                "hidden_activation": "gelu_pytorch_tanh",
                "sliding_window": int(get("attention.sliding_window")),
                "attn_logit_softcapping": get("attn_logit_softcapping", None),
                "final_logit_softcapping": get("final_logit_softcapping", None),
                "query_pre_attn_scalar": self._gemma2_query_scalar(hidden, heads, head_dim),
            }
        return config

    def _gemma2_query_scalar(self, hidden: int, heads: int, head_dim: int) -> float:
        """GGUF has no query_pre_attn_scalar: llama.cpp, the format's reader, takes hidden / heads for the
        46-layer Gemma-2 (27B, where it is 144) and head_dim otherwise (2B and 9B: 256)."""
        return float(hidden // heads if int(self.field("gemma2.block_count")) == 46 else head_dim)

    def _rows(self, name: str) -> int:
        return int(self.tensors[name][0][0])

    def has(self, key: str) -> bool:
        return key in self.where

    def file(self, key: str) -> GGUFCheckpoint:
        if key not in self.where:
            raise CheckpointError(f"{self.path}: tensor {key!r} not found")
        return self

    def array(self, key: str) -> GGUFTensor:
        """Tensor `key` (a Hugging Face key) as stored before llama.cpp's conversion."""
        name = self.where[key]
        rows, add = None, 0.0
        if self.architecture == "llama" and re.search(r"\.attn_[qk]\.(weight|bias)$", name):
            heads = self.config["num_attention_heads" if ".attn_q." in name else "num_key_value_heads"]
            rows = unpermute_rows(heads, self.config["head_dim"])
        if self.architecture == "gemma2" and name.endswith("norm.weight"):
            add = -1.0
        shape, qtype, offset = self.tensors[name]
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        if shape[-1] % block_size:
            raise CheckpointError(f"{self.path}: tensor {name!r} rows of {shape[-1]} are not whole {qtype.name} blocks")
        nbytes = math.prod(shape) // block_size * type_size
        return GGUFTensor(name, qtype, shape, self.data[offset : offset + nbytes], rows=rows, add=add)


def load_tokenizer(path: str | os.PathLike):
    """The Hugging Face tokenizer (vocabulary, merges, special tokens, chat template) stored in a GGUF file."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)


def convert(path: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "float32", tokenizer: bool = True) -> None:
    """Write a Hugging Face checkpoint directory (config.json, model.safetensors, tokenizer) from a GGUF file."""
    ckpt = GGUFCheckpoint(path)
    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
    tensors = {}
    for key, name in ckpt.where.items():
        if name == key:  # not a tensor of these families
            continue
        tensors[key] = np.asarray(ckpt.array(key)).astype(np_dtype)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    artifacts.write_safetensors(out / "model.safetensors", tensors, metadata={"format": "pt"})
    artifacts.write_json(out / "config.json", ckpt.config | {"torch_dtype": dtype, "dtype": dtype})
    if tokenizer and ckpt.field("tokenizer.ggml.model", None) is not None:
        load_tokenizer(path).save_pretrained(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m emjax.models.gguf", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    to_hf = commands.add_parser("convert", help="write a Hugging Face directory from a GGUF file")
    to_hf.add_argument("gguf_file")
    to_hf.add_argument("out_dir")
    to_hf.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = parser.parse_args(argv)
    convert(args.gguf_file, args.out_dir, dtype=args.dtype)
    print(f"wrote {args.out_dir}")


if __name__ == "__main__":
    main()
