"""Atomic writes and input fingerprints. A leaf module: it imports nothing of emjax.

Every artifact is written to a temporary name beside its target and renamed
into place, so a reader never sees half a file; a write that fails (a full
disk, a missing folder) raises an OSError that names the path.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

# numpy dtype -> safetensors dtype name (ml_dtypes gives numpy a bfloat16).
SAFETENSORS_DTYPES: dict[np.dtype, str] = {
    np.dtype(np.float64): "F64",
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
}
try:
    import ml_dtypes

    SAFETENSORS_DTYPES[np.dtype(ml_dtypes.bfloat16)] = "BF16"
except ImportError:  # pragma: no cover - ml_dtypes ships with jax
    pass


def _replace(tmp: Path, path: Path, write) -> None:
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from e


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    _replace(path.with_name(path.name + ".tmp"), path, lambda tmp: tmp.write_bytes(data))


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def strict(value):
    """`value` with every non-finite float (NaN, +-Infinity) replaced by None, at any depth.

    JSON has no NaN or Infinity (JSON.parse and strict parsers reject them): in our artifacts an
    undefined number is null. numpy scalars and arrays become Python numbers and lists; tuples lists.
    """
    if isinstance(value, Mapping):
        return {k.item() if isinstance(k, np.generic) else k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    if isinstance(value, np.ndarray):
        return strict(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps(value, *, indent: int | None = None) -> str:
    """Strict JSON text of `value` (see `strict`); objects JSON does not know are written as str()."""
    return json.dumps(strict(value), indent=indent, default=str, allow_nan=False)


def write_json(path: str | os.PathLike, value, *, indent: int = 2) -> None:
    """Write `value` as strict JSON: non-finite floats become null (never NaN or Infinity)."""
    write_text(path, dumps(value, indent=indent) + "\n")


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    path = Path(path)
    _replace(path.with_name(path.name + ".tmp.npy"), path, lambda tmp: np.save(tmp, array, allow_pickle=False))


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata=None) -> None:
    """Write numpy arrays (bfloat16 included) as one safetensors file."""
    header, offset = {}, 0
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    for key, array in arrays.items():
        if array.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"{path}: tensor {key!r} has dtype {array.dtype}, which safetensors cannot hold")
        header[key] = {
            "dtype": SAFETENSORS_DTYPES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            for array in arrays.values():
                f.write(array.tobytes())

    path = Path(path)
    _replace(path.with_name(path.name + ".tmp"), path, write)


# ---------------------------------------------------------------------------- fingerprints


def content_hash(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (data files: small enough to read whole)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _header_hash(path: Path) -> str | None:
    """A hash of a weights file's self-description (safetensors header, npz directory), cheap for any size."""
    with open(path, "rb") as f:
        if path.suffix == ".safetensors":
            size = f.read(8)
            n = int.from_bytes(size, "little") if len(size) == 8 else 0
            return hashlib.sha256(size + f.read(min(n, 1 << 26))).hexdigest()[:16]
        if path.suffix == ".npz":
            f.seek(max(0, path.stat().st_size - (1 << 16)))  # the zip central directory sits at the end
            return hashlib.sha256(f.read()).hexdigest()[:16]
    return None


def fingerprint(path: str | os.PathLike, *, hash_contents_below: int = 64 << 20) -> dict:
    """What identifies an external input: a file or every file of a directory.

    Files under `hash_contents_below` bytes (datasets, configs, tokenizers) are
    hashed whole; larger ones (weights) by size, mtime and their header.
    """
    path = Path(path)
    if not path.exists():
        return {"path": str(path), "missing": True}
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    out = {}
    for f in files:
        stat = f.stat()
        name = str(f.relative_to(path)) if path.is_dir() else f.name
        if stat.st_size < hash_contents_below:
            out[name] = {"size": stat.st_size, "sha256": content_hash(f)}
        else:
            out[name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "header": _header_hash(f)}
    return {"path": str(path.resolve()), "files": out}
