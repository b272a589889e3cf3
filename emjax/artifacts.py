"""Atomic writes, input and output fingerprints, checked CSV reads. A leaf module: it imports nothing of emjax.

Every artifact is written to a temporary name beside its target and renamed
into place, so a reader never sees half a file; a write that fails (a full
disk, a missing folder) raises an OSError that names the path.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
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


# ---------------------------------------------------------------------------- finished outputs


def output_fingerprints(folder: str | os.PathLike, *, exclude: tuple[str, ...] = ()) -> dict[str, dict]:
    """{path relative to `folder`: {"size", "mtime_ns", "sha256"}} of every file in it (`exclude`: top-level names).

    Written once, when a stage's output is complete: `changed_outputs` later re-checks them cheaply.
    """
    folder = Path(folder)
    out = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = f.relative_to(folder).as_posix()
        if name in exclude:
            continue
        stat = f.stat()
        out[name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": content_hash(f)}
    return out


def changed_outputs(folder: str | os.PathLike, recorded: dict[str, dict]) -> tuple[list[str], bool]:
    """What differs between `folder` and its recorded fingerprints: (one line per damaged file, whether
    some mtimes moved with the content unchanged). A file whose size and mtime match is trusted unread;
    only a file whose mtime moved is hashed again (`recorded` is updated in place with its new mtime)."""
    folder = Path(folder)
    problems, touched = [], False
    for name, expected in recorded.items():
        path = folder / name
        try:
            stat = path.stat()
        except FileNotFoundError:
            problems.append(f"{path} is missing")
            continue
        if stat.st_size != expected["size"]:
            problems.append(f"{path} changed size ({expected['size']} -> {stat.st_size} bytes)")
        elif stat.st_mtime_ns != expected["mtime_ns"]:
            if content_hash(path) != expected["sha256"]:
                problems.append(f"{path} changed (same size, other content)")
            else:
                expected["mtime_ns"], touched = stat.st_mtime_ns, True
    return problems, touched


def outputs_digest(recorded: dict[str, dict]) -> str:
    """One hash of a finished output's contents (names and content hashes; mtimes left out)."""
    contents = {name: f["sha256"] for name, f in recorded.items()}
    return hashlib.sha256(json.dumps(contents, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- checked CSV reads


class DamagedFileError(ValueError):
    """A file another step wrote is not what it wrote: a missing column, a cut line, a short row."""


def read_csv(path: str | os.PathLike, required: Sequence[str] = (), *, complete: bool = True) -> list[dict]:
    """The rows of a CSV file with a header, as dicts; DamagedFileError naming the file and the problem when
    a `required` column is missing, a row has another number of fields than the header or (`complete`: a
    file emjax wrote, which always ends with a line end) the last line is cut."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DamagedFileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text:
        raise DamagedFileError(f"{path}: empty (no header line)")
    if complete and not text.endswith("\n"):
        raise DamagedFileError(f"{path}: the last line is cut (the file does not end with a line end)")
    reader = csv.reader(io.StringIO(text, newline=""), strict=complete)  # others' files: csv's usual leniency
    try:
        header = next(reader)
        missing = [c for c in required if c not in header]
        if missing:
            raise DamagedFileError(f"{path}: no column {', '.join(map(repr, missing))} (it has {', '.join(header)})")
        rows = []
        for fields in reader:
            if not fields:
                continue  # a blank line, as csv.DictReader skips it
            if len(fields) != len(header):
                raise DamagedFileError(
                    f"{path}: line {reader.line_num} has {len(fields)} fields, the header {len(header)}"
                )
            rows.append(dict(zip(header, fields)))
    except csv.Error as e:
        raise DamagedFileError(f"{path}: line {reader.line_num}: {e}") from None
    return rows
