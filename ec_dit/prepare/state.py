"""What determines a prepared folder's bytes: recorded before the first shard, checked on every resume.

`fingerprint(...)` collects everything the shards depend on: the encoders' files
(weights, configs, the tokenizer), `examples_per_shard`, the image size, the
caption length, the image limits and the source listing. `prepare` writes it to
`OUT/prepare_state.json` before its first shard and into `manifest.json`; a
rerun on the same `--out` whose fingerprint differs stops before writing
anything, listing each difference (old -> new), as a training resume does.

Hashes (`HASH_KIND`): weights files (`.safetensors`, `.bin`, ...) and any file
over 4 MiB are hashed cheaply: sha256 of the file's size, its first 1 MiB (a
safetensors header with every tensor's name, dtype, shape and offsets) and 16
blocks of 64 KiB at evenly spaced offsets. That tells another checkpoint apart
at any size in milliseconds; it does not catch a single changed byte elsewhere.
Smaller files (config.json, the tokenizer) are hashed in full. The source
listing is hashed as the list of (image path, caption) pairs (and labels);
image file contents are not read for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

from ec_dit import errors

STATE = "prepare_state.json"
HASH_KIND = ("sha256 of size + first 1 MiB + 16 sampled 64 KiB blocks for weights files and files over 4 MiB; "
             "full sha256 otherwise")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".npz")
_FULL_LIMIT, _HEAD, _BLOCK, _BLOCKS = 4 << 20, 1 << 20, 64 << 10, 16


def file_hash(path: str | os.PathLike) -> str:
  """The file's hash as `HASH_KIND` describes (first 16 hex digits)."""
  size = os.path.getsize(path)
  h = hashlib.sha256()
  with open(path, "rb") as f:
    if size <= _FULL_LIMIT and not str(path).endswith(WEIGHT_SUFFIXES):
      h.update(f.read())
    else:
      h.update(size.to_bytes(8, "little"))
      h.update(f.read(_HEAD))
      for k in range(_BLOCKS):
        f.seek(max(0, (size - _BLOCK) * k // max(_BLOCKS - 1, 1)))
        h.update(f.read(_BLOCK))
  return h.hexdigest()[:16]


def folder_hashes(folder: str | None) -> dict[str, str] | None:
  """{relative path: file_hash} of every file under an encoder's folder (hidden files excepted)."""
  if not folder:
    return None
  root = pathlib.Path(folder)
  return {str(p.relative_to(root)): file_hash(p) for p in sorted(root.rglob("*"))
          if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)}


def source_listing(source, input_config) -> dict:
  """The source's identity: its spec, length and a hash of its (image, caption, label) listing when it has one."""
  c = input_config
  out = {"spec": c.source, "num_examples": len(source), "image_key": c.image_key, "caption_key": c.caption_key}
  pairs = getattr(source, "pairs", None)
  if pairs is not None:
    listing = [[str(p), str(cap)] for p, cap in pairs] + [list(getattr(source, "labels", None) or [])]
    out["listing_sha256"] = hashlib.sha256(json.dumps(listing, ensure_ascii=False).encode()).hexdigest()[:16]
  else:  # generated or TFDS sources: the fields that decide their examples
    out.update(data_seed=c.get("data_seed"), source_num_examples=c.get("num_examples"),
               shapes_world_tasks=list(c.get("shapes_world_tasks") or []))
  return out


def fingerprint(config, input_config, source, *, examples_per_shard: int, min_image_size: int,
                max_image_pixels: int, need_t5: bool) -> dict:
  """Everything that determines the shards' bytes (see the module docstring)."""
  e = config.encoders
  return {
      "hash_kind": HASH_KIND,
      "encoders": {"t5": folder_hashes(e.t5_path) if need_t5 else None, "vae": folder_hashes(e.vae_path),
                   "dtype": str(e.dtype)},
      "examples_per_shard": int(examples_per_shard),
      "image_size": int(input_config.image_size),
      "context_len": int(config.model.context_len),
      "min_image_size": int(min_image_size),
      "max_image_pixels": int(max_image_pixels),
      "source": source_listing(source, input_config),
  }


def _flatten(d, prefix=""):
  out = {}
  for k, v in (d or {}).items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def differences(old: dict, new: dict) -> list[str]:
  """`key: old -> new` for every differing entry (nested keys joined by dots)."""
  a, b = _flatten(old), _flatten(new)
  return [f"{k}: {a.get(k, '(none)')!r} -> {b.get(k, '(none)')!r}" for k in sorted(set(a) | set(b))
          if a.get(k, "(none)") != b.get(k, "(none)")]


def check_resume(out: str | os.PathLike, new: dict, has_shards: bool) -> dict | None:
  """Compares `new` with the fingerprint the folder was started with; returns the old one (None: no shard yet).

  Raises PrepareError, before anything is written, when the folder holds shards
  and the fingerprints differ, or it holds shards but no fingerprint (then a
  resume cannot be checked). Without shards there is nothing to mix with.
  """
  path = pathlib.Path(out) / STATE
  if not has_shards:
    return None  # nothing written yet that a difference could mix with (e.g. a start that failed to load encoders)
  if not path.is_file():
    raise errors.PrepareError(f"{out} holds shards but no {STATE}, so resuming cannot be checked to encode the "
                              f"same data with the same encoders; use a new --out")
  try:
    old = json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise errors.PrepareError(f"{path} is not valid JSON ({e}); use a new --out") from None
  diff = differences(old, new)
  if diff:
    raise errors.PrepareError(
        f"{out} was started with other settings, inputs or encoders; resuming would mix or drop data. Nothing was "
        f"written. Differences (old -> new): " + "; ".join(diff[:20]) + (f"; ... {len(diff) - 20} more"
                                                                         if len(diff) > 20 else "")
        + f". Resume with the original settings, or use a new --out.")
  return old


def record(out: str | os.PathLike, fp: dict) -> None:
  """Writes the fingerprint (atomically) before the first shard."""
  path = pathlib.Path(out) / STATE
  tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
  tmp.write_text(json.dumps(fp, indent=2, sort_keys=True))
  os.replace(tmp, path)
