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


def read_manifest(folder: str | os.PathLike) -> dict:
  """The manifest of a prepared folder; a ValueError naming `config.input.source` if it is missing or bad."""
  path = pathlib.Path(folder) / MANIFEST
  if not path.is_file():
    raise ValueError(f"config.input.source: {path} not found: 'latents:DIR' needs a folder written by "
                     f"`python -m ec_dit.prepare` (README: \"Train EC-DiT on your own data\"); a prepare run "
                     f"that has not finished writes its manifest last")
  try:
    manifest = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"config.input.source: {path} is not valid JSON ({e})") from None
  if manifest.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"config.input.source: {path}: format_version {manifest.get('format_version')!r}, "
                     f"this library reads {FORMAT_VERSION}")
  return manifest


def shard_paths(folder: str | os.PathLike, manifest: dict) -> list[str]:
  """The shard files the manifest lists, each checked to exist."""
  paths = [str(pathlib.Path(folder) / name) for name in manifest["shards"]]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise ValueError(f"config.input.source: {len(missing)} shard(s) listed in the manifest are missing, "
                     f"e.g. {missing[0]}")
  return paths


def latents_source(folder: str | os.PathLike) -> grain.sources.ArrayRecordDataSource:
  """grain random-access source over the prepared records (bytes), in source order."""
  manifest = read_manifest(folder)
  return grain.sources.ArrayRecordDataSource(shard_paths(folder, manifest))


def check_compatible(manifest: dict, model_config, prefix: str = "config.model") -> None:
  """The prepared shapes must fit the model: latent size and channels, text width and length (the text
  only for the text-to-image model; the class-conditional `arch = "dit_moe"` reads latents and labels)."""
  h, w, c = manifest["latent_shape"]
  expected = {"input_size": h, "in_channels": c}
  class_cond = model_config.get("arch", "ec_dit") == "dit_moe"
  if not class_cond:
    expected["context_dim"] = manifest["feature_dim"]
  for field, value in expected.items():
    if model_config[field] != value:
      raise ValueError(f"{prefix}.{field}: the prepared data (manifest.json) has {value}, the config "
                       f"{model_config[field]}" + (" (prepared without T5 features: prepare with a text-to-image "
                                                     "config and config.encoders.t5_path)" if not value else ""))
  if not class_cond and manifest["context_len"] > model_config.context_len:
    raise ValueError(f"{prefix}.context_len: the data was prepared with up to {manifest['context_len']} "
                     f"tokens, the model takes {model_config.context_len}")


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
