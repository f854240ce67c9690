"""Reads PyTorch checkpoints without PyTorch, and without running any code from the file.

`load(path)` reads a `torch.save` zip archive (PyTorch >= 1.6) or a `.safetensors`
file and returns its object tree with every tensor as a numpy array.

A pickle can call any importable function while it loads (`os.system` is one
`GLOBAL` opcode away), so `torch.load` on a file from the internet can run code.
The unpickler here resolves only the few globals a tensor checkpoint needs
(`ALLOWED_GLOBALS`: tensor rebuilders, typed storages, `collections.OrderedDict`)
and rebuilds tensors itself; any other global, or a persistent id that is not a
storage, raises `UnsafeCheckpointError` naming it, before anything is called.

The pickle is treated as data, not code: each load gets fresh stand-ins for the
allowed globals (a BUILD or SETITEM opcode aimed at them is refused, and could not
outlive the load anyway), every `_rebuild_tensor_v2` argument is checked before
memory is read (`check_tensor`: no negative offset or stride, every element
inside its storage), the tensors of one load may take at most MAX_EXPANSION x
the file's bytes, and storages are read-only. Anything malformed raises
`ec_dit.errors.CheckpointError` naming the file (tests/test_untrusted_files.py
fuzzes this with random mutations of the committed fixtures).
"""

from __future__ import annotations

import collections
import io
import json
import math
import os
import pickle
import pickletools
import struct
import sys
import zipfile
import zlib
from typing import Any

import ml_dtypes
import numpy as np

from ec_dit.errors import CheckpointError

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


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
  """The checkpoint's pickle asks for something a tensor checkpoint never needs (and is refused)."""


# Everything the tensors of one load may hold, as a multiple of the file's bytes (plus a small floor): a
# torch.save file stores each storage once; "model" and "ema" entries viewing the same storages, or a
# broadcast (stride-0) tensor, can make the arrays larger than the file, never by more than this.
MAX_EXPANSION = 4
MIN_BUDGET = 1 << 20
# Errors a malformed (truncated, corrupted, crafted) file raises while it is parsed: all become CheckpointError.
PARSE_ERRORS = (pickle.UnpicklingError, ValueError, TypeError, KeyError, IndexError, AttributeError, EOFError,
                OverflowError, RecursionError, struct.error, zipfile.BadZipFile, zlib.error, NotImplementedError,
                LookupError)


class _Frozen:
  """A per-load stand-in for an allow-listed global: no `__dict__`, and BUILD (`__setstate__`) is refused."""
  __slots__ = ()

  def __setstate__(self, state):
    raise UnsafeCheckpointError(f"refusing to change the allow-listed global {self!r} (a BUILD opcode on it)")

  def __setattr__(self, name, value):
    raise UnsafeCheckpointError(f"refusing to set {name!r} on the allow-listed global {self!r}")


class _StorageType(_Frozen):
  """Stands for `torch.<Name>Storage` inside the pickle: only its dtype matters."""
  __slots__ = ("name", "dtype")

  def __init__(self, name: str):
    object.__setattr__(self, "name", name)
    object.__setattr__(self, "dtype", np.dtype(STORAGE_DTYPES[name]))

  def __repr__(self):
    return f"torch.{self.name}"


def _ints(value, what: str, source: str) -> tuple[int, ...]:
  if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
    raise CheckpointError(f"{source}: tensor {what} must be a tuple of integers, got {type(value).__name__}")
  return tuple(value)


def check_tensor(storage, storage_offset, size, stride, source: str = "checkpoint") -> int:
  """Validates a strided view before any memory is touched; returns its element count.

  Requires a 1-D storage array, a non-negative integer offset, non-negative
  integer sizes and strides of the same rank, and every addressed element
  inside the storage (a negative stride or offset is refused, not interpreted).
  """
  if not isinstance(storage, np.ndarray) or storage.ndim != 1:
    raise CheckpointError(f"{source}: a tensor's storage must be a tensor storage, got {type(storage).__name__}")
  size, stride = _ints(size, "size", source), _ints(stride, "stride", source)
  if not isinstance(storage_offset, int) or isinstance(storage_offset, bool) or storage_offset < 0:
    raise CheckpointError(f"{source}: tensor storage offset {storage_offset!r} is not a non-negative integer")
  if len(size) != len(stride) or any(n < 0 for n in size) or any(s < 0 for s in stride):
    raise CheckpointError(f"{source}: tensor of size {size} and stride {stride}: sizes and strides must be "
                          f"non-negative and of the same rank")
  numel = math.prod(size)
  if numel == 0:
    if storage_offset > storage.size:
      raise CheckpointError(f"{source}: empty tensor at offset {storage_offset} past its storage of "
                            f"{storage.size} elements")
    return 0
  last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.size:
    raise CheckpointError(f"{source}: tensor of size {size} and stride {stride} at offset {storage_offset} "
                          f"overruns its storage of {storage.size} elements")
  return numel


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None, *, source: str = "checkpoint"):
  """torch._utils._rebuild_tensor_v2: a strided view of a storage (checked by `check_tensor` first), contiguous."""
  del requires_grad, backward_hooks, metadata
  check_tensor(storage, storage_offset, size, stride, source)
  size, stride = tuple(size), tuple(stride)
  if not size:
    return np.array(storage[storage_offset])
  if math.prod(size) == 0:
    return np.zeros(size, storage.dtype)
  base = storage[storage_offset:]
  view = np.lib.stride_tricks.as_strided(base, shape=size, strides=[s * base.itemsize for s in stride],
                                         writeable=False)
  return np.ascontiguousarray(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *args):
  """torch._utils._rebuild_parameter(s): an nn.Parameter is its tensor here."""
  del requires_grad, backward_hooks, args
  if not isinstance(data, np.ndarray):
    raise CheckpointError(f"a parameter must hold a tensor, got {type(data).__name__}")
  return data


class _Function(_Frozen):
  """A per-load wrapper of an allow-listed function (calls it; cannot be changed by the pickle)."""
  __slots__ = ("fn", "name")

  def __init__(self, fn, name: str):
    object.__setattr__(self, "fn", fn)
    object.__setattr__(self, "name", name)

  def __call__(self, *args):
    return self.fn(*args)

  def __repr__(self):
    return self.name


def _budgeted_rebuild(source: str, budget: int):
  """A `_rebuild_tensor_v2` for one load that counts the bytes of the arrays it makes against `budget`."""
  left = [budget]

  def rebuild(storage, storage_offset, size, stride, *rest):
    left[0] -= max(check_tensor(storage, storage_offset, size, stride, source), 1) * storage.itemsize
    if left[0] < 0:
      raise CheckpointError(f"{source}: its tensors would take more than {MAX_EXPANSION}x the file's size "
                            f"(tensor of size {tuple(size)}, stride {tuple(stride)}): refused")
    return _rebuild_tensor_v2(storage, storage_offset, size, stride, *rest[:3], source=source)
  return rebuild


def _ordered_dict(*args):
  if len(args) > 1 or (args and not isinstance(args[0], (list, tuple))):
    raise CheckpointError(f"collections.OrderedDict called with {len(args)} argument(s) of an unexpected kind")
  return collections.OrderedDict(*args)


ALLOWED_GLOBALS = ("collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter",
                   "torch._utils._rebuild_parameter_with_state", *(f"torch.{name}" for name in STORAGE_DTYPES))


def _allowed_globals(source: str, budget: int) -> dict[tuple[str, str], Any]:
  """Fresh objects for ALLOWED_GLOBALS, made for one load: nothing a file does to them outlives it."""
  return {
      ("collections", "OrderedDict"): _Function(_ordered_dict, "collections.OrderedDict"),
      ("torch._utils", "_rebuild_tensor_v2"): _Function(_budgeted_rebuild(source, budget),
                                                        "torch._utils._rebuild_tensor_v2"),
      ("torch._utils", "_rebuild_parameter"): _Function(_rebuild_parameter, "torch._utils._rebuild_parameter"),
      ("torch._utils", "_rebuild_parameter_with_state"): _Function(
          _rebuild_parameter, "torch._utils._rebuild_parameter_with_state"),
      **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
  }


class RestrictedUnpickler(pickle.Unpickler):
  """Unpickles a `torch.save` data.pkl, resolving only ALLOWED_GLOBALS; storages come from `read_storage`.

  `budget` caps the bytes of all tensors this load makes (default: unlimited for
  in-memory pickles; `load_torch_zip` passes MAX_EXPANSION x the file's size).
  """

  def __init__(self, file, read_storage, source: str = "checkpoint", budget: int | None = None):
    super().__init__(file)
    self._read_storage = read_storage
    self._source = source
    self._storages: dict[str, np.ndarray] = {}
    self._globals = _allowed_globals(source, sys.maxsize if budget is None else budget)

  def find_class(self, module: str, name: str):
    target = self._globals.get((module, name))
    if target is None:
      raise UnsafeCheckpointError(
          f"{self._source}: refusing to load global {module}.{name}: a tensor checkpoint only needs "
          f"tensor rebuilders, typed storages and collections.OrderedDict (loading it could run code)")
    return target

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str) and isinstance(pid[4], int) and pid[4] >= 0):
      raise UnsafeCheckpointError(f"{self._source}: refusing persistent id {pid!r:.200}: only tensor storages "
                                  f"('storage', type, key, location, numel) allowed")
    _, storage_type, key, _location, numel = pid[:5]
    if key not in self._storages:
      self._storages[key] = self._read_storage(key, storage_type.dtype, numel)
    storage = self._storages[key]
    if storage.dtype != storage_type.dtype or storage.size != numel:
      raise CheckpointError(f"{self._source}: storage {key} is referenced as {numel} x {storage_type} and as "
                            f"{storage.size} x {storage.dtype}")
    return storage


# Opcodes that build objects other than by REDUCE on an allowed global, or read out-of-band buffers: never needed.
REFUSED_OPCODES = frozenset({"INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4", "PERSID", "NEXT_BUFFER",
                             "READONLY_BUFFER", "BYTEARRAY8"})


def check_opcodes(data: bytes, source: str = "checkpoint") -> None:
  """Reads the pickle's opcodes before it runs: each one complete (no length past the end), none refused, and
  memo indices below the pickle's length (a huge PUT index would make the unpickler allocate its memo to it).
  A truncated opcode raises ValueError (`load_torch_zip` reports it as a CheckpointError)."""
  for op, arg, pos in pickletools.genops(data):
    if op.name in REFUSED_OPCODES:
      raise UnsafeCheckpointError(f"{source}: refusing pickle opcode {op.name} at byte {pos}")
    if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and not 0 <= int(arg) < len(data):
      raise CheckpointError(f"{source}: pickle memo index {arg} at byte {pos} is out of range")


def load_torch_zip(path: str) -> Any:
  """Loads a `torch.save` zip archive (PyTorch >= 1.6) with `RestrictedUnpickler`; tensors become numpy arrays.
  Any malformed content raises CheckpointError naming the file."""
  if not zipfile.is_zipfile(path):
    raise CheckpointError(f"{path}: not a torch.save zip archive (the legacy pre-1.6 format is not supported; "
                          f"re-save it with torch.save in a recent PyTorch, or as .safetensors)")
  try:
    return _load_torch_zip(path)
  except CheckpointError:
    raise
  except (*PARSE_ERRORS, OSError) as e:  # OSError: a zip directory pointing before the file's start, ...
    raise CheckpointError(f"{path}: not a readable torch.save checkpoint ({type(e).__name__}: {e})"[:400]) from None


def _load_torch_zip(path: str) -> Any:
  file_bytes = os.path.getsize(path)
  with zipfile.ZipFile(path) as archive:
    names = infos = {i.filename: i for i in archive.infolist()}
    declared = sum(i.file_size for i in infos.values())
    if declared > MAX_EXPANSION * file_bytes + MIN_BUDGET:  # a zip bomb: compressed entries that expand
      raise CheckpointError(f"{path}: its entries would expand to {declared} bytes from a {file_bytes}-byte file")
    pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pickles) != 1:
      raise CheckpointError(f"{path}: expected one data.pkl in the archive, found {pickles[:5]}")
    prefix = pickles[0][:-len("data.pkl")]
    order = archive.read(prefix + "byteorder").decode().strip() if prefix + "byteorder" in names else "little"
    if order != "little":
      raise CheckpointError(f"{path}: big-endian checkpoints are not supported (byteorder={order[:20]!r})")

    def read_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
      entry = f"{prefix}data/{key}"
      if entry not in infos:
        raise CheckpointError(f"{path}: storage {entry[:100]} is missing from the archive")
      if infos[entry].file_size < numel * dtype.itemsize:
        raise CheckpointError(f"{path}: storage {entry} holds {infos[entry].file_size} bytes, {numel} x {dtype} "
                              f"need more")
      raw = archive.read(entry)
      return np.frombuffer(raw, dtype=dtype, count=numel)  # read-only: no opcode can write into it

    data = archive.read(pickles[0])
    check_opcodes(data, path)
    budget = MAX_EXPANSION * file_bytes + MIN_BUDGET
    return RestrictedUnpickler(io.BytesIO(data), read_storage, source=path, budget=budget).load()


def load_safetensors(path: str) -> dict[str, np.ndarray]:
  """Reads a .safetensors file (an 8-byte header length, a JSON header, raw little-endian tensors); every header
  entry is checked (dtype, shape, byte range inside the file) before its bytes are read (else CheckpointError)."""
  with open(path, "rb") as f:
    blob = f.read()
  if len(blob) < 8:
    raise CheckpointError(f"{path}: too short for a safetensors file")
  (n,) = struct.unpack("<Q", blob[:8])
  if 8 + n > len(blob):
    raise CheckpointError(f"{path}: safetensors header of {n} bytes overruns the file")
  try:
    header = json.loads(blob[8:8 + n])
  except (ValueError, RecursionError) as e:
    raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e})"[:300]) from None
  if not isinstance(header, dict):
    raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
  data = memoryview(blob)[8 + n:]
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if not (isinstance(info, dict) and isinstance(info.get("dtype"), str)
            and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
            and isinstance(info.get("shape"), list)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                    for v in info["data_offsets"] + info["shape"])):
      raise CheckpointError(f"{path}: tensor {name[:100]!r} has a malformed header entry "
                            f"(needs dtype, non-negative shape and data_offsets)")
    if info["dtype"] not in SAFETENSORS_DTYPES:
      raise CheckpointError(f"{path}: tensor {name!r} has dtype {info['dtype'][:20]}; supported: "
                            f"{sorted(SAFETENSORS_DTYPES)}")
    dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]])
    start, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if end < start or end - start != math.prod(shape) * dtype.itemsize or end > len(data):
      raise CheckpointError(f"{path}: tensor {name!r} of shape {shape} {info['dtype']} has a bad byte range")
    out[name] = np.frombuffer(data[start:end], dtype=dtype).reshape(shape).copy()
  return out


def load(path: str) -> Any:
  """A checkpoint's object tree with numpy tensors: `.safetensors` by extension, else a torch.save zip."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint {path} not found")
  if path.endswith(".safetensors"):
    return load_safetensors(path)
  return load_torch_zip(path)
