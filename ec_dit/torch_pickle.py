"""Reads PyTorch checkpoints without PyTorch, and without running any code from the file.

`load(path)` reads a `torch.save` zip archive (PyTorch >= 1.6) or a `.safetensors`
file and returns its object tree with every tensor as a numpy array.

A pickle can call any importable function while it loads (`os.system` is one
`GLOBAL` opcode away), so `torch.load` on a file from the internet can run code.
The unpickler here resolves only the few globals a tensor checkpoint needs
(`ALLOWED_GLOBALS`: tensor rebuilders, typed storages, `collections.OrderedDict`)
and rebuilds tensors itself; any other global, or a persistent id that is not a
storage, raises `UnsafeCheckpointError` naming it, before anything is called.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

# torch's legacy typed storage classes (what `torch.save` pickles) -> numpy dtype
STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I64": np.int64,
    "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class UnsafeCheckpointError(pickle.UnpicklingError):
  """The checkpoint's pickle asks for something a tensor checkpoint never needs (and is refused)."""


class _StorageType:
  """Stands for `torch.<Name>Storage` inside the pickle: only its dtype matters."""

  def __init__(self, name: str):
    self.name, self.dtype = name, np.dtype(STORAGE_DTYPES[name])


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
  """torch._utils._rebuild_tensor_v2: a strided view of a storage, copied to a contiguous numpy array."""
  del requires_grad, backward_hooks, metadata
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if not size:
    return np.array(storage[storage_offset])
  needed = storage_offset + 1 + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else storage_offset
  if needed > storage.size:
    raise pickle.UnpicklingError(f"tensor of size {size} and stride {stride} at offset {storage_offset} "
                                 f"overruns its storage of {storage.size} elements")
  base = storage[storage_offset:]
  view = np.lib.stride_tricks.as_strided(base, shape=size, strides=[s * base.itemsize for s in stride],
                                         writeable=False)
  return np.ascontiguousarray(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *args):
  """torch._utils._rebuild_parameter(s): an nn.Parameter is its tensor here."""
  del requires_grad, backward_hooks, args
  return data


ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class RestrictedUnpickler(pickle.Unpickler):
  """Unpickles a `torch.save` data.pkl, resolving only ALLOWED_GLOBALS; storages come from `read_storage`."""

  def __init__(self, file, read_storage, source: str = "checkpoint"):
    super().__init__(file)
    self._read_storage = read_storage
    self._source = source
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str):
    target = ALLOWED_GLOBALS.get((module, name))
    if target is None:
      raise UnsafeCheckpointError(
          f"{self._source}: refusing to load global {module}.{name}: a tensor checkpoint only needs "
          f"tensor rebuilders, typed storages and collections.OrderedDict (loading it could run code)")
    return target

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
      raise UnsafeCheckpointError(f"{self._source}: refusing persistent id {pid!r}: only tensor storages allowed")
    _, storage_type, key, _location, numel = pid[:5]
    key = str(key)
    if key not in self._storages:
      self._storages[key] = self._read_storage(key, storage_type.dtype, int(numel))
    return self._storages[key]


def load_torch_zip(path: str) -> Any:
  """Loads a `torch.save` zip archive (PyTorch >= 1.6) with `RestrictedUnpickler`; tensors become numpy arrays."""
  if not zipfile.is_zipfile(path):
    raise ValueError(f"{path}: not a torch.save zip archive (the legacy pre-1.6 format is not supported; "
                     f"re-save it with torch.save in a recent PyTorch, or as .safetensors)")
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pickles) != 1:
      raise ValueError(f"{path}: expected one data.pkl in the archive, found {pickles}")
    prefix = pickles[0][:-len("data.pkl")]
    order = archive.read(prefix + "byteorder").decode().strip() if prefix + "byteorder" in names else "little"
    if order != "little":
      raise ValueError(f"{path}: big-endian checkpoints are not supported (byteorder={order!r})")

    def read_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
      entry = f"{prefix}data/{key}"
      if entry not in names:
        raise ValueError(f"{path}: storage {entry} is missing from the archive")
      raw = archive.read(entry)
      if len(raw) < numel * dtype.itemsize:
        raise ValueError(f"{path}: storage {entry} holds {len(raw)} bytes, {numel} x {dtype} need more")
      return np.frombuffer(raw, dtype=dtype, count=numel)

    with archive.open(pickles[0]) as f:
      return RestrictedUnpickler(f, read_storage, source=path).load()


def load_safetensors(path: str) -> dict[str, np.ndarray]:
  """Reads a .safetensors file (an 8-byte header length, a JSON header, raw little-endian tensors)."""
  with open(path, "rb") as f:
    blob = f.read()
  if len(blob) < 8:
    raise ValueError(f"{path}: too short for a safetensors file")
  (n,) = struct.unpack("<Q", blob[:8])
  if 8 + n > len(blob):
    raise ValueError(f"{path}: safetensors header of {n} bytes overruns the file")
  header = json.loads(blob[8:8 + n])
  data = memoryview(blob)[8 + n:]
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in SAFETENSORS_DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}; supported: {sorted(SAFETENSORS_DTYPES)}")
    dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]])
    start, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if end - start != int(np.prod(shape)) * dtype.itemsize or end > len(data):
      raise ValueError(f"{path}: tensor {name!r} of shape {shape} {info['dtype']} has a bad byte range")
    out[name] = np.frombuffer(data[start:end], dtype=dtype).reshape(shape).copy()
  return out


def load(path: str) -> Any:
  """A checkpoint's object tree with numpy tensors: `.safetensors` by extension, else a torch.save zip."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint {path} not found")
  if path.endswith(".safetensors"):
    return load_safetensors(path)
  return load_torch_zip(path)
