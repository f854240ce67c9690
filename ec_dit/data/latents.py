"""Prepared latent datasets: ArrayRecord shards of VAE latent statistics and T5 features.

`python -m ec_dit.prepare` writes a folder (PixArt-alpha's way: encode once,
train many times) that `config.input.source = "latents:DIR"` reads:

  DIR/manifest.json                  counts, shapes, dtypes, image size, latent scaling and
                                     shift, context length, encoders and a hash of their configs
  DIR/shard-00000-of-00008.array_record   examples [s * per_shard, (s + 1) * per_shard) of the source
  DIR/skipped.jsonl                  examples left out, with the reason

A record is one example, serialised without pickle: a little-endian uint32
header length, a JSON header, then the raw bytes of each array in header order:

  {"caption": str, "label": int (-1: none), "index": int (in the source),
   "text_len": int, "truncated": bool,
   "arrays": [["latent_mean", "bfloat16", [h, w, c]], ["latent_std", ...], ["features", "bfloat16", [n, d]]]}

`features` holds only the unpadded tokens (n = text_len <= context_len); the
reader pads them to `context_len` with a mask. bfloat16 arrays are stored as
their 16-bit patterns.
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
from typing import Any, Mapping

import grain
import ml_dtypes
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader

from ec_dit import errors

MANIFEST = "manifest.json"
SKIPPED = "skipped.jsonl"
FORMAT_VERSION = 1
BF16 = ml_dtypes.bfloat16
_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float16": np.float16, "int32": np.int32}


def shard_name(index: int, count: int) -> str:
  """The file name of shard `index` of `count`."""
  return f"shard-{index:05d}-of-{count:05d}.array_record"


def encode_record(arrays: Mapping[str, np.ndarray], **header: Any) -> bytes:
  """One example as bytes: header fields (JSON-serialisable) and named arrays."""
  specs, blobs = [], []
  for name, a in arrays.items():
    a = np.ascontiguousarray(a)
    dtype = next((k for k, v in _DTYPES.items() if a.dtype == np.dtype(v)), None)
    if dtype is None:
      raise ValueError(f"array {name!r}: dtype {a.dtype} not storable; use one of {sorted(_DTYPES)}")
    specs.append([name, dtype, list(a.shape)])
    blobs.append(a.tobytes())
  head = json.dumps(dict(header, arrays=specs), sort_keys=True, ensure_ascii=False).encode("utf-8")
  return struct.pack("<I", len(head)) + head + b"".join(blobs)


def decode_record(record: bytes) -> tuple[dict, dict[str, np.ndarray]]:
  """(header, arrays) of a record written by `encode_record`."""
  (n,) = struct.unpack_from("<I", record, 0)
  header = json.loads(record[4:4 + n].decode("utf-8"))
  arrays, offset = {}, 4 + n
  for name, dtype, shape in header.pop("arrays"):
    dt = np.dtype(_DTYPES[dtype])
    size = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    arrays[name] = np.frombuffer(record, dt, count=size // dt.itemsize, offset=offset).reshape(shape)
    offset += size
  return header, arrays


MANIFEST_FIELDS = ("latent_shape", "feature_dim", "context_len", "shards", "num_examples", "scaling_factor")


def read_manifest(folder: str | os.PathLike) -> dict:
  """The manifest of a prepared folder; a DataError naming `config.input.source` and the file if it is missing
  or bad (not JSON, another format version, a required field missing)."""
  path = pathlib.Path(folder) / MANIFEST
  if not path.is_file():
    raise errors.DataError(f"config.input.source: {path} not found: 'latents:DIR' needs a folder written by "
                           f"`python -m ec_dit.prepare` (README: \"Train EC-DiT on your own data\"); a prepare run "
                           f"that has not finished writes its manifest last")
  try:
    manifest = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise errors.DataError(f"config.input.source: {path} is not valid JSON ({e})") from None
  if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    raise errors.DataError(f"config.input.source: {path}: format_version {version!r}, this library reads "
                           f"{FORMAT_VERSION}")
  missing = [k for k in MANIFEST_FIELDS if k not in manifest]
  if missing:
    raise errors.DataError(f"config.input.source: {path} lacks the fields {missing}")
  return manifest


def shard_paths(folder: str | os.PathLike, manifest: dict) -> list[str]:
  """The shard files the manifest lists, each checked to exist."""
  paths = [str(pathlib.Path(folder) / name) for name in manifest["shards"]]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise errors.DataError(f"config.input.source: {len(missing)} shard(s) listed in the manifest are missing, "
                           f"e.g. {missing[0]}")
  return paths


def _check_record(path: str, index: int, record: bytes, manifest: dict) -> None:
  """One record's header against the manifest: its arrays, their dtypes and shapes; DataError naming the shard."""
  try:
    header, arrays = decode_record(record)
  except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as e:
    raise errors.DataError(f"{path}: record {index} is not a prepared example ({type(e).__name__}: {e})") from None
  expected = {"latent_mean": tuple(manifest["latent_shape"]), "latent_std": tuple(manifest["latent_shape"])}
  for name, shape in expected.items():
    got = tuple(arrays[name].shape) if name in arrays else None
    if got != shape:
      raise errors.DataError(f"{path}: record {index} has {name} of shape {got}; manifest.json says latent_shape "
                             f"{list(shape)} (shards from another prepare run?)")
  feats = arrays.get("features")
  if feats is None or feats.ndim != 2 or (feats.shape[0] and feats.shape[1] != manifest["feature_dim"]):
    raise errors.DataError(f"{path}: record {index} has features of shape {None if feats is None else feats.shape}; "
                           f"manifest.json says feature_dim {manifest['feature_dim']}")
  if feats.shape[0] > manifest["context_len"] or int(header.get("text_len", -1)) != feats.shape[0]:
    raise errors.DataError(f"{path}: record {index} has {feats.shape[0]} text tokens (text_len "
                           f"{header.get('text_len')!r}); manifest.json says context_len {manifest['context_len']}")


def check_shards(folder: str | os.PathLike, manifest: dict) -> list[int]:
  """Every shard readable (its Riegeli header and footer), its record count equal to its sidecar's, the total
  equal to the manifest's, and its first record shaped as the manifest says; returns the records per shard.
  Raises DataError naming the file. Reads each shard's footer and one record: cheap at start."""
  counts = []
  for path in shard_paths(folder, manifest):
    if os.path.getsize(path) == 0:
      raise errors.DataError(f"{path}: empty shard file (0 bytes); rerun prepare into a new --out")
    try:
      reader = ArrayRecordReader(path)
      try:
        n = reader.num_records() if reader.ok() else -1
        first = reader.read([0])[0] if n > 0 else None
      finally:
        reader.close()
    except RuntimeError as e:
      raise errors.DataError(f"{path}: damaged shard ({str(e).splitlines()[0][:200]}); rerun prepare into a new "
                             f"--out, or restore the file") from None
    sidecar = pathlib.Path(path + ".json")
    expected = json.loads(sidecar.read_text()).get("count") if sidecar.is_file() else None
    if n < 0 or (expected is not None and n != expected):
      raise errors.DataError(f"{path}: holds {max(n, 0)} readable records, its sidecar {sidecar.name} says "
                             f"{expected} (truncated or replaced?)")
    if first is not None:
      _check_record(path, 0, first, manifest)
    counts.append(n)
  if sum(counts) != manifest.get("num_examples", sum(counts)):
    raise errors.DataError(f"{pathlib.Path(folder) / MANIFEST}: num_examples {manifest['num_examples']}, the shards "
                           f"hold {sum(counts)}")
  return counts


class LatentsSource:
  """Random-access source over the prepared records (bytes), in source order; a record that cannot be read
  (a checksum error) or is shaped unlike the manifest raises DataError naming its shard and record."""

  def __init__(self, folder: str | os.PathLike):
    self.manifest = read_manifest(folder)
    self.paths = shard_paths(folder, self.manifest)
    self.starts = np.cumsum([0] + check_shards(folder, self.manifest))
    self._source = grain.sources.ArrayRecordDataSource(self.paths)

  def __len__(self) -> int:
    return int(self.starts[-1])

  def __getitem__(self, index: int) -> bytes:
    index = int(index)
    try:
      record = self._source[index]
    except RuntimeError as e:
      shard, j = self._where(index)
      raise errors.DataError(f"{self.paths[shard]}: record {j} (example {index}) cannot be read "
                             f"({str(e).splitlines()[0][:200]}); rerun prepare, or restore the file") from None
    shard, j = self._where(index)
    _check_record(self.paths[shard], j, record, self.manifest)
    return record

  def _where(self, index: int) -> tuple[int, int]:
    shard = int(np.searchsorted(self.starts, index % len(self), side="right")) - 1
    return shard, index % len(self) - int(self.starts[shard])

  def __repr__(self) -> str:
    return f"LatentsSource({len(self.paths)} shards, {len(self)} records)"


def latents_source(folder: str | os.PathLike) -> LatentsSource:
  """The checked random-access source of a prepared folder (`LatentsSource`)."""
  return LatentsSource(folder)


def check_compatible(manifest: dict, model_config, prefix: str = "config.model", where: str = MANIFEST, *,
                     text: bool = True) -> None:
  """The prepared shapes must fit the model: latent size and channels, and with `text` (a task that reads
  captions, `Task.needs_text_encoder`; not the class-conditional one) text width and length.
  Errors name the field and the manifest (`where`)."""
  shape = manifest.get("latent_shape")
  if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) and v > 0 for v in shape)):
    raise errors.DataError(f"{where}: latent_shape must be [h, w, c] of positive integers, got {shape!r}")
  h, w, c = shape
  if h != w:
    raise errors.DataError(f"{where}: latent_shape {shape} is not square; the model takes input_size x input_size")
  expected = {"input_size": h, "in_channels": c}
  if text:
    expected["context_dim"] = manifest["feature_dim"]
  for field, value in expected.items():
    if model_config[field] != value:
      raise errors.DataError(
          f"{prefix}.{field}: the prepared data ({where}) has {value}, the config {model_config[field]}"
          + (" (prepared without T5 features: prepare with a text-to-image config and config.encoders.t5_path)"
             if not value else ""))
  if text and manifest["context_len"] > model_config.context_len:
    raise errors.DataError(f"{prefix}.context_len: the data ({where}) was prepared with up to "
                           f"{manifest['context_len']} tokens, the model takes {model_config.context_len}")


class DecodeLatents(grain.transforms.Map):
  """Record bytes -> {"latent_mean", "latent_std": float32 [h, w, c], "features": float32 [L, d],
  "mask": bool [L], "label": int32}, the features zero-padded to `context_len`.

  The statistics come out in the model's latent space: the mean as
  (mean - shift_factor) * scaling_factor and the std times scaling_factor, so
  `latent_mean + latent_std * eps` is a scaled sample of the VAE's posterior.
  """

  def __init__(self, context_len: int, scaling_factor: float = 1.0, shift_factor: float | None = None):
    self.context_len = int(context_len)
    self.scale, self.shift = np.float32(scaling_factor), np.float32(shift_factor or 0.0)

  def map(self, record: bytes) -> dict:
    header, arrays = decode_record(record)
    feats = np.asarray(arrays["features"], np.float32)
    n = min(int(header["text_len"]), self.context_len)
    features = np.zeros((self.context_len, feats.shape[-1]), np.float32)
    features[:n] = feats[:n]
    mask = np.zeros((self.context_len,), np.bool_)
    mask[:n] = True
    return {
        "latent_mean": (np.asarray(arrays["latent_mean"], np.float32) - self.shift) * self.scale,
        "latent_std": np.asarray(arrays["latent_std"], np.float32) * self.scale,
        "features": features,
        "mask": mask,
        "label": np.int32(header.get("label", -1)),
    }
