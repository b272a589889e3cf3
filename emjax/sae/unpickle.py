"""Read a torch.save zip archive of tensors (a state dict) without torch and without running code.

A pickle can call any importable function. This reader resolves only the
names a tensor state dict needs (as torch's weights_only mode does): tensor
and parameter rebuilds, typed storages and OrderedDict. Any other name is
refused before anything is called, so nothing in a hostile file runs.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pickle
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np

STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class UnsafePickleError(ValueError):
    """A pickle that names something other than tensors and ordered dicts."""


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(STORAGE_DTYPES[name])


@dataclasses.dataclass(frozen=True)
class _TensorView:
    """A tensor as the pickle describes it: a view into a storage, built only once checked."""

    storage: np.ndarray
    offset: object
    size: object
    stride: object

    def build(self, source: Path, name: str) -> np.ndarray:
        """The tensor's values, after checking that every element it reads lies inside its storage.

        A crafted view past its storage would otherwise read heap memory (or crash) in as_strided.
        """
        offset, size, stride = self.offset, self.size, self.stride
        if not isinstance(self.storage, np.ndarray):
            raise UnsafePickleError(f"{source}: tensor {name!r} is not built on a storage")
        if not (_is_count(offset) and _is_counts(size) and _is_counts(stride) and len(size) == len(stride)):
            raise UnsafePickleError(
                f"{source}: tensor {name!r} has an invalid view (offset {offset!r}, size {size!r}, stride {stride!r})"
            )
        size, stride = tuple(size), tuple(stride)
        length = len(self.storage)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))  # the highest element index it reads
        if 0 not in size and last >= length:
            raise UnsafePickleError(
                f"{source}: tensor {name!r} reads element {last} of a storage of {length} elements "
                f"(offset {offset}, size {size}, stride {stride}); the file is corrupt or crafted"
            )
        if 0 in size:
            return np.zeros(size, self.storage.dtype)
        if not size:  # as_strided reads an empty shape as "keep the input's shape"
            return np.array(self.storage[offset])
        itemsize = self.storage.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            self.storage[offset:], shape=size, strides=tuple(s * itemsize for s in stride), writeable=False
        )
        return np.ascontiguousarray(view)


def _is_count(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0


def _is_counts(ns) -> bool:
    return isinstance(ns, (tuple, list)) and all(_is_count(n) for n in ns)


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    return _TensorView(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks, *state):
    return data


ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _TensorUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str, source: Path):
        super().__init__(file)
        self.archive, self.prefix, self.byteorder, self.source = archive, prefix, byteorder, source
        self.storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED:
            return ALLOWED[module, name]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafePickleError(
            f"{self.source}: refusing to load the pickle global {module}.{name}; "
            "only tensors, parameters and OrderedDicts are allowed (nothing in the file was run)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise UnsafePickleError(f"{self.source}: unexpected persistent id {pid!r} in a tensor archive")
        _, storage_type, key, _location, numel = pid
        if key not in self.storages:
            member = f"{self.prefix}data/{key}"
            try:
                raw = self.archive.read(member)
            except KeyError:
                raise UnsafePickleError(f"{self.source}: storage {member} is missing from the archive") from None
            dtype = storage_type.dtype.newbyteorder("<" if self.byteorder == "little" else ">")
            if not isinstance(numel, int) or numel < 0 or numel * dtype.itemsize > len(raw):
                raise UnsafePickleError(
                    f"{self.source}: storage {member} holds {len(raw)} bytes, "
                    f"fewer than its {numel!r} elements of {dtype.name} need"
                )
            array = np.frombuffer(raw, dtype=dtype, count=numel)
            self.storages[key] = array.astype(storage_type.dtype, copy=False)
        return self.storages[key]


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a torch zip archive (torch.save of a state dict) as numpy arrays."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a torch zip archive (legacy pickled .pt files are not read)")
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"{path}: expected one data.pkl in the archive, found {pickles}")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder_name = f"{prefix}byteorder"
        byteorder = archive.read(byteorder_name).decode() if byteorder_name in archive.namelist() else "little"
        with archive.open(pickles[0]) as f:
            state = _TensorUnpickler(f, archive, prefix, byteorder, path).load()
    if not isinstance(state, dict) or not all(isinstance(v, _TensorView) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return {name: view.build(path, name) for name, view in state.items()}
