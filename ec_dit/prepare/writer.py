"""Encode a source once into ArrayRecord shards of latent statistics and T5 features (`python -m ec_dit.prepare`).

The source's examples are cut into shards of `examples_per_shard` consecutive
indices; process p of P encodes shards p, p + P, p + 2P, ... (each process a
disjoint slice; together the whole dataset). A shard is written to a temporary
name and renamed when complete, after its sidecar `.json` (its count, the
examples it skipped and why, the captions it truncated): a killed run,
restarted, skips the shards already complete, and no reader ever sees half a
shard. Records depend only on the example and the encoders, so the same input
gives byte-identical shards, however many processes or restarts.

Bad input loses nothing and stops nothing: an unreadable, corrupt, too small or
too large image (over `max_image_pixels`, checked from its header before decoding),
or a float / 16-bit image whose values fit no known range, is skipped and listed in
`skipped.jsonl` with its reason; an empty
caption is kept (it trains the unconditional model); a caption longer than the
context is truncated and counted. The manifest is written last, by process 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from typing import Any, Sequence

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from tqdm import tqdm

from ec_dit.data import latents, preprocess

SIDECAR = ".json"
TMP = ".tmp"


@dataclasses.dataclass
class Example:
  """One source example, read and checked: the image at the training size, or why it was skipped."""
  index: int
  caption: str
  label: int
  image: np.ndarray | None = None
  skipped: str | None = None


MAX_IMAGE_PIXELS = 36_000_000  # 6000 x 6000: well under Pillow's 89M-pixel bomb warning; --max_image_pixels


def read_example(source, index: int, *, image_size: int, min_image_size: int, image_key: str = "image",
                 caption_key: str = "caption", label_key: str = "label",
                 max_image_pixels: int = MAX_IMAGE_PIXELS) -> Example:
  """Reads example `index` of `source`; a bad image or caption becomes a skip reason, never an exception.

  The image's size is read from its header first: one over `max_image_pixels` is
  skipped before it is decoded (a small PNG can decode to gigabytes)."""
  try:
    raw = source[index]
  except Exception as e:  # noqa: BLE001 - a source that cannot produce the example: skip it
    return Example(index, "", -1, skipped=f"unreadable example: {type(e).__name__}: {e}")
  caption = raw.get(caption_key, "")
  if isinstance(caption, preprocess.UnreadableCaption):
    return Example(index, "", -1, skipped=caption.reason)
  try:
    caption = preprocess.caption_text(caption)
  except UnicodeDecodeError as e:
    return Example(index, "", -1, skipped=f"caption is not UTF-8 ({e})")
  label = int(raw.get(label_key, -1)) if np.ndim(raw.get(label_key, -1)) == 0 else -1
  where = raw[image_key] if isinstance(raw.get(image_key), str) else f"example {index}"
  try:
    size = preprocess.image_size_of(raw[image_key])
    if min(size) < min_image_size:
      return Example(index, caption, label, skipped=f"image {where} is {size[0]}x{size[1]}, smaller than "
                                                        f"--min_image_size={min_image_size}")
    if size[0] * size[1] > max_image_pixels:
      return Example(index, caption, label, skipped=f"image {where} is {size[0]}x{size[1]} = {size[0] * size[1]} "
                                                        f"pixels, over --max_image_pixels={max_image_pixels}")
    image = preprocess.load_image(raw[image_key], image_size)
  except Exception as e:  # noqa: BLE001 - corrupt, truncated or unreadable image: skip it, say why
    return Example(index, caption, label, skipped=f"image {where} cannot be read: {type(e).__name__}: {e}")
  return Example(index, caption, label, image=image)


def shard_ranges(num_examples: int, per_shard: int) -> list[tuple[int, int]]:
  """[start, stop) of each shard's source indices."""
  return [(s, min(s + per_shard, num_examples)) for s in range(0, num_examples, per_shard)]


def has_shards(out: str | os.PathLike) -> bool:
  """Whether `out` holds any shard or shard sidecar (finished or not)."""
  out = pathlib.Path(out)
  return out.is_dir() and any(p.name.startswith("shard-") for p in out.iterdir())


def is_complete(out: pathlib.Path, name: str) -> bool:
  return (out / name).is_file() and (out / (name + SIDECAR)).is_file()


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
  tmp = path.with_name(path.name + TMP)
  tmp.write_bytes(data)
  os.replace(tmp, path)


def write_shard(out: pathlib.Path, name: str, records: Sequence[bytes], sidecar: dict) -> None:
  """Writes one shard: sidecar first, then the records under a temporary name, renamed when complete."""
  _atomic_write(out / (name + SIDECAR), json.dumps(sidecar, sort_keys=True, ensure_ascii=False).encode())
  tmp = out / (name + TMP)
  writer = ArrayRecordWriter(str(tmp), "group_size:1")
  for r in records:
    writer.write(r)
  writer.close()
  os.replace(tmp, out / name)


def encode_shard(examples: list[Example], encoders, batch_size: int) -> tuple[list[bytes], int]:
  """(records in index order, truncated captions) for the shard's good examples, `batch_size` at a time."""
  good = [e for e in examples if e.skipped is None]
  records, truncated = [], 0
  for start in range(0, len(good), batch_size):
    chunk = good[start:start + batch_size]
    mean, std = encoders.latent_stats(np.stack([e.image for e in chunk]))
    if encoders.t5 is not None:
      features, _, lengths, cut = encoders.text_features([e.caption for e in chunk])
    else:  # class-conditional data: no text features (an empty array, text_len 0)
      features = np.zeros((len(chunk), 0, 0), np.float32)
      lengths, cut = np.zeros(len(chunk), np.int32), np.zeros(len(chunk), bool)
    truncated += int(cut.sum())
    for i, e in enumerate(chunk):
      n = int(lengths[i])
      records.append(latents.encode_record(
          {"latent_mean": mean[i].astype(latents.BF16), "latent_std": std[i].astype(latents.BF16),
           "features": features[i, :n].astype(latents.BF16)},
          caption=e.caption, label=e.label, index=e.index, text_len=n, truncated=bool(cut[i])))
  return records, truncated


def prepare_shards(source, out: str | os.PathLike, *, encoders, image_size: int, min_image_size: int,
                   examples_per_shard: int, batch_size: int, process_index: int = 0, process_count: int = 1,
                   max_shards: int | None = None, keys: dict | None = None, progress: bool = True,
                   max_image_pixels: int = MAX_IMAGE_PIXELS) -> dict:
  """Encodes this process's shards of `source` into `out` (skipping complete ones); returns counts.

  `max_shards` stops after that many newly written shards (a preemptible job can
  prepare in installments; rerunning continues).
  """
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  ranges = shard_ranges(len(source), examples_per_shard)
  names = [latents.shard_name(s, len(ranges)) for s in range(len(ranges))]
  mine = [s for s in range(len(ranges)) if s % process_count == process_index]
  todo = [s for s in mine if not is_complete(out, names[s])]
  keys = keys or {}
  done_before = len(mine) - len(todo)
  written = images = 0
  t0 = time.time()
  with tqdm(total=sum(ranges[s][1] - ranges[s][0] for s in mine), desc="prepare", unit="img",
            disable=not progress, dynamic_ncols=True) as bar:  # closed on errors too: the error line comes last
    bar.update(sum(ranges[s][1] - ranges[s][0] for s in mine if s not in todo))
    for s in todo:
      if max_shards is not None and written >= max_shards:
        break
      start, stop = ranges[s]
      examples = [read_example(source, i, image_size=image_size, min_image_size=min_image_size,
                               max_image_pixels=max_image_pixels, **keys) for i in range(start, stop)]
      records, truncated = encode_shard(examples, encoders, batch_size)
      skipped = [{"index": e.index, "reason": e.skipped} for e in examples if e.skipped is not None]
      write_shard(out, names[s], records, {"shard": s, "count": len(records), "skipped": skipped,
                                           "truncated": truncated, "range": [start, stop]})
      written += 1
      images += stop - start
      bar.update(stop - start)
      bar.set_postfix(img_per_s=f"{images / max(time.time() - t0, 1e-9):.1f}")
  return {"shards_total": len(ranges), "shards_mine": len(mine), "shards_done_before": done_before,
          "shards_written": written, "complete": all(is_complete(out, names[s]) for s in mine)}


def write_manifest(out: str | os.PathLike, *, num_source_examples: int, examples_per_shard: int,
                   fields: dict[str, Any]) -> dict:
  """Merges the shards' sidecars into `skipped.jsonl` and `manifest.json` (written last, atomically)."""
  out = pathlib.Path(out)
  ranges = shard_ranges(num_source_examples, examples_per_shard)
  names = [latents.shard_name(s, len(ranges)) for s in range(len(ranges))]
  missing = [n for n in names if not is_complete(out, n)]
  if missing:
    raise RuntimeError(f"{len(missing)} shard(s) not complete in {out}, e.g. {missing[0]}: rerun prepare")
  sidecars = [json.loads((out / (n + SIDECAR)).read_text()) for n in names]
  skipped = [row for sc in sidecars for row in sc["skipped"]]
  _atomic_write(out / latents.SKIPPED, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in skipped).encode())
  count = sum(sc["count"] for sc in sidecars)
  sizes = sum((out / n).stat().st_size for n in names)
  manifest = dict(fields, format_version=latents.FORMAT_VERSION, num_examples=count,
                  num_source_examples=num_source_examples, skipped=len(skipped),
                  truncated=sum(sc["truncated"] for sc in sidecars), examples_per_shard=examples_per_shard,
                  shards=names, bytes_per_example=round(sizes / max(count, 1), 1))
  _atomic_write(out / latents.MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
  return manifest
