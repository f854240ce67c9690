"""Reading Hugging Face checkpoints (a local folder) into NNX modules. Nothing downloads.

A folder holds `config.json` and the weights: one `*.safetensors` file, or
shards listed by a `*.safetensors.index.json` (its `weight_map`). PyTorch
`.bin` files are read only when torch is importable; otherwise the error says
how to convert them.

Each NNX parameter names its source tensor and a layout permutation (`Source`):
the target is `tensor.transpose(perm)` (linear `[out, in]` -> `[in, out]` is
`(1, 0)`, conv OIHW -> HWIO is `(2, 3, 1, 0)`). `load_module` checks every name
and shape before reading anything, then reads each parameter once; on a mesh
each device's block is read straight from the file (`safetensors` slices) and
placed with the parameter's sharding, so no host holds a full copy of a large
model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open

from ec_dit import errors, sharding

_SHOW = 5  # how many names an error lists


class CheckpointError(errors.CheckpointError):
  """A checkpoint that does not match the module: missing, unexpected or mis-shaped tensors."""


@dataclasses.dataclass(frozen=True)
class Source:
  """Where a parameter comes from: the first of `names` present, transposed by `perm`."""
  names: tuple[str, ...]
  perm: tuple[int, ...] | None = None


LINEAR = (1, 0)  # torch Linear [out, in] -> [in, out]
CONV = (2, 3, 1, 0)  # torch Conv2d [out, in, kh, kw] -> HWIO [kh, kw, in, out]


def require_folder(path: str | os.PathLike) -> str:
  path = os.fspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise CheckpointError(f"checkpoint folder {path!r} is a file, not a folder: pass the folder that holds the "
                          f"Hugging Face config.json and weights (docs/encoders.md)")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint folder {path!r} does not exist (nothing is downloaded: "
                            f"place the Hugging Face files there first, see docs/encoders.md)")
  return path


def model_folder(path: str | os.PathLike, subfolder: str) -> str:
  """`path`, or its `subfolder` (a diffusers pipeline's `text_encoder/`, `vae/`) when only that has a config.json."""
  folder = require_folder(path)
  sub = os.path.join(folder, subfolder)
  if not os.path.isfile(os.path.join(folder, "config.json")) and os.path.isfile(os.path.join(sub, "config.json")):
    return sub
  return folder


def read_config(path: str | os.PathLike) -> dict:
  """The parsed `config.json` of a checkpoint folder."""
  folder = require_folder(path)
  file = os.path.join(folder, "config.json")
  if not os.path.isfile(file):
    raise FileNotFoundError(f"no config.json in checkpoint folder {folder!r} (found: {sorted(os.listdir(folder))})")
  with open(file) as f:
    return json.load(f)


def config_fields(config_cls, cfg: dict) -> dict:
  """The entries of a parsed config.json that are fields of the dataclass `config_cls` (the rest are ignored)."""
  fields = {f.name for f in dataclasses.fields(config_cls)}
  return {k: v for k, v in cfg.items() if k in fields}


def unsupported(field: str, value, allowed) -> CheckpointError:
  """The error for a config.json field this library does not implement."""
  return CheckpointError(f"config.json: unsupported architecture field {field}={value!r} (supported: {allowed})")


class Reader:
  """Tensors of a checkpoint by name: `names()`, `shape(name)`, `read(name, index)`."""

  def __init__(self, files: dict[str, str], torch_tensors: dict | None = None):
    self._file_of = files  # tensor name -> safetensors path
    self._torch = torch_tensors  # or name -> numpy array (from a .bin)
    self._open: dict[str, object] = {}

  def close(self) -> None:
    for handle in self._open.values():
      handle.__exit__(None, None, None)
    self._open.clear()

  def names(self) -> list[str]:
    return list(self._torch) if self._torch is not None else list(self._file_of)

  def _handle(self, name: str):
    path = self._file_of[name]
    if path not in self._open:
      self._open[path] = safe_open(path, framework="numpy")
    return self._open[path]

  def shape(self, name: str) -> tuple[int, ...]:
    if self._torch is not None:
      return tuple(self._torch[name].shape)
    return tuple(self._handle(name).get_slice(name).get_shape())

  def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
    """The tensor (or its block `index`, in the file's layout) as a numpy array."""
    if self._torch is not None:
      x = self._torch[name]
      return x if index is None else x[index]
    if index is None:
      return self._handle(name).get_tensor(name)
    return self._handle(name).get_slice(name)[index]


def _bin_reader(files: list[str]) -> Reader:
  try:
    import torch  # noqa: PLC0415 - optional, only for PyTorch .bin checkpoints
  except ImportError:
    names = ", ".join(os.path.basename(f) for f in files)
    raise CheckpointError(
        f"{names}: PyTorch .bin weights need torch, which is not installed. Convert them to safetensors once, "
        f"without torch and without running code from the file (ec_dit.convert.torch_pickle's restricted unpickler): "
        f"python -c \"from ec_dit.convert import torch_pickle; from safetensors.numpy import save_file; "
        f"save_file(dict(torch_pickle.load('pytorch_model.bin')), 'model.safetensors')\" "
        f"(per shard for sharded .bin files, then drop the .bin index), or use a repository with .safetensors files"
    ) from None
  tensors = {}
  for file in files:
    for name, t in torch.load(file, map_location="cpu", weights_only=True).items():
      tensors[name] = (t.float() if t.dtype == torch.bfloat16 else t).contiguous().numpy()
  return Reader({}, tensors)


def open_weights(path: str | os.PathLike, stems: Sequence[str]) -> Reader:
  """A Reader over `<stem>.safetensors` (or its sharded index) for the first stem found in the folder.

  `stems` e.g. ("model",) for transformers, ("diffusion_pytorch_model",) for diffusers.
  """
  folder = require_folder(path)
  for stem in stems:
    single = os.path.join(folder, f"{stem}.safetensors")
    index = single + ".index.json"
    if os.path.isfile(single):
      with safe_open(single, framework="numpy") as f:
        return Reader({k: single for k in f.keys()})
    if os.path.isfile(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      files = {k: os.path.join(folder, v) for k, v in weight_map.items()}
      missing = sorted({f for f in files.values() if not os.path.isfile(f)})
      if missing:
        raise FileNotFoundError(f"{index} lists shards that are not in the folder: {missing}")
      return Reader(files)
  for stem in stems:
    bin_stem = "pytorch_model" if stem == "model" else stem  # transformers' .bin name differs
    single = os.path.join(folder, f"{bin_stem}.bin")
    index = single + ".index.json"
    if os.path.isfile(single):
      return _bin_reader([single])
    if os.path.isfile(index):
      with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
      return _bin_reader([os.path.join(folder, s) for s in shards])
  wanted = [f"{s}.safetensors" for s in stems] + [f"{s}.safetensors.index.json" for s in stems]
  raise FileNotFoundError(f"no weights in {folder!r}: expected one of {wanted} (found: {sorted(os.listdir(folder))})")


def _listing(names: Iterable[str]) -> str:
  names = sorted(names)
  more = f", ... ({len(names) - _SHOW} more)" if len(names) > _SHOW else ""
  return f"{len(names)}: {names[:_SHOW]}{more}"


def _target_shape(shape: tuple[int, ...], perm) -> tuple[int, ...]:
  return shape if perm is None else tuple(shape[p] for p in perm)


def check_names(reader: Reader, sources: dict[str, Source], ignore: Callable[[str], bool]) -> dict[str, str]:
  """Target path -> the chosen checkpoint name; raises CheckpointError on missing or unexpected tensors."""
  available = set(reader.names())
  chosen, missing = {}, []
  for target, src in sources.items():
    hit = next((n for n in src.names if n in available), None)
    if hit is None:
      missing.append(src.names[0])
    else:
      chosen[target] = hit
  alternatives = {n for src in sources.values() for n in src.names}
  unexpected = [n for n in available if n not in alternatives and not ignore(n)]
  problems = []
  if missing:
    problems.append(f"missing keys {_listing(missing)}")
  if unexpected:
    problems.append(f"unexpected keys {_listing(unexpected)}")
  if problems:
    raise CheckpointError("checkpoint does not match the module: " + "; ".join(problems))
  return chosen


def _path_str(path) -> str:
  return ".".join(str(p) for p in path)


def load_module(abstract_module: nnx.Module, sources: dict[str, Source], reader: Reader, *,
                ignore: Callable[[str], bool] = lambda name: False, mesh: Mesh | None = None,
                rules=sharding.DEFAULT_RULES) -> nnx.Module:
  """Fills an abstract module (from `nnx.eval_shape`) with the checkpoint's tensors.

  `sources` maps each parameter path ("layers.0.attn.q.kernel") to its Source;
  checkpoint tensors that no Source names must satisfy `ignore` (e.g. a T5
  decoder) or they are reported as unexpected. Parameters are cast to the
  abstract module's dtypes. With a mesh, each parameter is created with
  `jax.make_array_from_callback` from its logical axes and `rules`: every
  device reads only its own block of the tensor.
  """
  graphdef, state = nnx.split(abstract_module)
  flat = {_path_str(path): var for path, var in nnx.to_flat_state(state)}
  if set(sources) != set(flat):
    raise AssertionError(f"internal mapping error: unmapped {sorted(set(flat) - set(sources))[:5]}, "
                         f"unknown {sorted(set(sources) - set(flat))[:5]}")
  try:
    chosen = check_names(reader, sources, ignore)
    for target, var in flat.items():
      shape = _target_shape(reader.shape(chosen[target]), sources[target].perm)
      if shape != tuple(var.shape):
        raise CheckpointError(f"shape mismatch for {chosen[target]!r} (parameter {target}): checkpoint gives "
                              f"{shape} after the layout change ({reader.shape(chosen[target])} in the file), "
                              f"the module (from config.json) expects {tuple(var.shape)}")
    values = {target: _read(reader, chosen[target], sources[target].perm, var, mesh, rules)
              for target, var in flat.items()}
  finally:
    reader.close()
  for path, var in nnx.to_flat_state(state):
    var.set_value(values[_path_str(path)])
  return nnx.merge(graphdef, state)


def load_pretrained(module_cls, config_cls, path: str | os.PathLike, *, subfolder: str, stems: Sequence[str],
                    sources: Callable[[nnx.Module], dict[str, Source]],
                    ignore: Callable[[str], bool] = lambda name: False, dtype, param_dtype, mesh: Mesh | None,
                    rules) -> nnx.Module:
  """`module_cls(config, ...)` with a local folder's weights (`from_pretrained` of the encoders).

  The folder (or its pipeline's `subfolder`) gives `config_cls.from_dict(config.json)` and the
  weights of one of `stems` (`open_weights`); `sources(abstract module)` names each parameter's
  tensor, and `load_module` reads them (`ignore`: checkpoint tensors left unread on purpose).
  """
  folder = model_folder(path, subfolder)
  config = config_cls.from_dict(read_config(folder))
  reader = open_weights(folder, stems)
  abstract = nnx.eval_shape(lambda: module_cls(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
  return load_module(abstract, sources(abstract), reader, ignore=ignore, mesh=mesh, rules=rules)


def _read(reader: Reader, name: str, perm, var: nnx.Variable, mesh: Mesh | None, rules) -> jax.Array:
  """One parameter: whole on the default device, or block by block into its sharding on `mesh`."""

  def block(index=None):
    if index is not None and perm is not None:  # the device's block, in the file's layout
      file_index = [slice(None)] * len(perm)
      for i, p in enumerate(perm):
        file_index[p] = index[i]
      index = tuple(file_index)
    x = reader.read(name, index)
    return np.ascontiguousarray((x if perm is None else x.transpose(perm)).astype(var.dtype))

  if mesh is None:
    return jnp.asarray(block())
  axes = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
  return jax.make_array_from_callback(tuple(var.shape), sharding.named_sharding(axes, var.shape, mesh, rules), block)
