"""Where examples come from: the sources ``config.input.source`` names, as grain random-access sources.

* ``"shapes_world"`` -- the embedded procedural domain
  (:class:`ec_dit.data.shapes_world.ShapesWorldSource`), rendered directly at
  ``image_size`` with ``num_examples`` examples and seed ``data_seed``.
* ``"tfds:NAME[/CONFIG][:VERSION][:SPLIT]"`` -- a TFDS dataset read with
  ``tfds.data_source`` (array_record, no TensorFlow needed), e.g.
  ``"tfds:shapes_world/size32:train"``. ``SPLIT`` defaults to ``train`` and
  may carry a slice (``train[:10%]``). The dataset must already be prepared
  in ``tfds_data_dir``; only ``shapes_world`` (generated locally) is prepared
  on first use. Nothing is ever downloaded.
* ``"folder:PATH"`` -- image files in ``PATH`` (sorted by name) with a
  same-stem ``.txt`` caption beside each (or ImageNet-style class subfolders
  of images: the label is the class's sorted index), or a ``captions.jsonl`` /
  ``metadata.jsonl`` in ``PATH`` whose lines name the image (``file_name`` or
  ``image_key``, relative to ``PATH``) and its caption (``caption_key`` or
  ``text``).
* ``"latents:DIR"`` -- VAE latent statistics and T5 features prepared by
  ``python -m ec_dit.prepare`` (:mod:`ec_dit.data.latents`).
* ``"jsonl:PATH"`` -- lines ``{"image": path, "caption": str}`` (keys
  ``image_key`` / ``caption_key``); relative image paths are relative to the
  JSONL file's folder.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Sequence

from ec_dit import errors, schema
from ec_dit.data import latents
from ec_dit.data.preprocess import UnreadableCaption
from ec_dit.data.shapes_world import ShapesWorldSource

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FOLDER_CAPTION_FILES = ("captions.jsonl", "metadata.jsonl")
# Datasets that may be generated on first use (locally, no download).
LOCALLY_GENERATED_TFDS = ("shapes_world",)


def check_source(input_config) -> None:
  """Checks that the files or dataset ``config.input.source`` names exist and can be read.

  Raises ValueError naming ``config.input.source``: a missing folder, a folder
  without images, a missing JSONL file, a TFDS dataset that is unknown or not
  prepared in ``tfds_data_dir`` (except ``shapes_world``, generated locally).
  """
  c = schema.with_input_defaults(input_config)
  kind, detail = schema.parse_source(c.source)
  if kind == "folder":
    if not detail.is_dir():
      schema.fail("input.source", "'folder:PATH' with an existing folder", c.source)
    if not _folder_images(detail) and not class_folders(detail):
      schema.fail("input.source", f"'folder:PATH' with image files ({', '.join(IMAGE_EXTENSIONS)}), or class "
                  f"subfolders of them", c.source)
  elif kind == "jsonl":
    if not detail.is_file():
      schema.fail("input.source", "'jsonl:PATH' with an existing JSONL file", c.source)
  elif kind == "tfds":
    _tfds_builder(c)  # raises if unknown or not prepared
  elif kind == "latents":
    if detail is None:
      schema.fail("input.source", f"'latents:DIR', a folder written by `python -m ec_dit.prepare` (see the "
                  f"{schema.PREPARE_README})", c.source)
    latents.check_shards(detail, latents.read_manifest(detail))  # every shard readable and shaped as the manifest


def check_input_and_source(input_config) -> None:
  """Checks ``config.input`` before anything is built or compiled: the fields
  (``ec_dit.schema.validate_input``) and the files they name (:func:`check_source`).
  Raises ValueError naming the first bad field (``config.input.source: ...``)."""
  schema.validate_input(input_config)
  check_source(input_config)


class ImageCaptionFiles:
  """grain random-access source over ``(image path, caption)`` pairs.

  ``source[i]`` is ``{"image": str path, "caption": str}``; images are read
  and decoded by the pipeline's map, in the reading thread/worker.
  """

  def __init__(self, pairs: Sequence[tuple[str, str]], labels: Sequence[int] | None = None):
    self.pairs = list(pairs)
    self.labels = None if labels is None else list(labels)

  def __len__(self) -> int:
    return len(self.pairs)

  def __getitem__(self, index: int) -> dict:
    path, caption = self.pairs[int(index)]
    if self.labels is None:
      return {"image": path, "caption": caption}
    return {"image": path, "caption": caption, "label": self.labels[int(index)]}

  def __repr__(self) -> str:
    return f"ImageCaptionFiles({len(self.pairs)} pairs)"


def _folder_images(folder: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def class_folders(folder: pathlib.Path) -> list[pathlib.Path]:
  """ImageNet-style class subfolders (sorted; label = position), when `folder` itself holds no images."""
  if _folder_images(folder):
    return []
  return sorted(d for d in folder.iterdir() if d.is_dir() and _folder_images(d))


def read_caption(txt: pathlib.Path, skip_bad_examples: bool):
  """A caption file's text; if it is not UTF-8, an `UnreadableCaption` with the reason (skipping on) or a
  `DataError` naming the file (skipping off)."""
  try:
    return txt.read_text(encoding="utf-8").strip()
  except UnicodeDecodeError as e:
    reason = f"caption file {txt} is not UTF-8 ({e})"
    if not skip_bad_examples:
      raise errors.DataError(f"config.input.source: {reason}; re-save it as UTF-8 (e.g. iconv -f latin1 -t utf-8), "
                             f"or set config.input.skip_bad_examples=True to skip bad examples") from None
    return UnreadableCaption(reason)


def class_folder_source(folder: pathlib.Path, skip_bad_examples: bool = False) -> ImageCaptionFiles:
  """Images in class subfolders: label = the class's index, caption = a same-stem .txt if present, else ""."""
  pairs, labels = [], []
  for label, d in enumerate(class_folders(folder)):
    for img in _folder_images(d):
      txt = img.with_suffix(".txt")
      pairs.append((str(img), read_caption(txt, skip_bad_examples) if txt.is_file() else ""))
      labels.append(label)
  return ImageCaptionFiles(pairs, labels)


def _read_jsonl(path: pathlib.Path, base: pathlib.Path, image_keys: Sequence[str],
                caption_keys: Sequence[str]) -> list[tuple[str, str]]:
  pairs = []
  with open(path, "rb") as f:
    for n, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"config.input.source: {path}:{n}: not UTF-8 ({e}); re-encode the file as UTF-8 "
                         f"(e.g. iconv -f latin1 -t utf-8)") from None
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"config.input.source: {path}:{n}: not valid JSON ({e})") from None
      image = next((rec[k] for k in image_keys if k in rec), None) if isinstance(rec, dict) else None
      caption = next((rec[k] for k in caption_keys if k in rec), None) if isinstance(rec, dict) else None
      if not isinstance(image, str) or not isinstance(caption, str):
        raise ValueError(f"config.input.source: {path}:{n}: each line must be an object with string fields "
                         f"{' or '.join(map(repr, image_keys))} (image path) and "
                         f"{' or '.join(map(repr, caption_keys))} (caption), got {line.strip()[:200]!r}")
      image_path = pathlib.Path(os.path.expanduser(image))
      if not image_path.is_absolute():
        image_path = base / image_path
      pairs.append((str(image_path), caption))
  if not pairs:
    raise ValueError(f"config.input.source: {path} has no image-caption lines")
  missing = [p for p, _ in pairs[:1000] if not os.path.isfile(p)]  # cheap sanity check of the first lines
  if missing:
    raise ValueError(f"config.input.source: {path}: image file not found: {missing[0]}")
  return pairs


def _folder_pairs(folder: pathlib.Path, c) -> list[tuple[str, str]]:
  for name in FOLDER_CAPTION_FILES:
    if (folder / name).is_file():
      return _read_jsonl(folder / name, folder, (c.image_key, "file_name"), (c.caption_key, "text"))
  pairs = []
  for img in _folder_images(folder):
    txt = img.with_suffix(".txt")
    if not txt.is_file():
      raise ValueError(f"config.input.source: image {img} has no caption file {txt.name} beside it "
                       f"(and the folder has no {' / '.join(FOLDER_CAPTION_FILES)})")
    pairs.append((str(img), read_caption(txt, c.skip_bad_examples)))
  if not pairs:
    raise ValueError(f"config.input.source: folder {folder} has no image files ({', '.join(IMAGE_EXTENSIONS)})")
  return pairs


def _tfds_builder(c):
  """The TFDS builder of a ``tfds:`` source; raises ValueError if unusable."""
  import tensorflow_datasets as tfds  # seconds to import: only tfds: sources pay it
  import ec_dit.data.shapes_world_tfds  # noqa: F401  (registers 'shapes_world'; imports tfds)
  name, split = schema.parse_source(c.source)[1]
  data_dir = c.tfds_data_dir or None
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # DatasetNotFoundError, bad config name, ...
    raise ValueError(f"config.input.source: TFDS dataset {name!r} not found ({type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''})") from None
  if name.split("/")[0].split(":")[0] not in LOCALLY_GENERATED_TFDS and not builder.is_prepared():
    raise ValueError(
        f"config.input.source: TFDS dataset {name!r} is not prepared in data_dir "
        f"{builder.data_dir!r} (config.input.tfds_data_dir={c.tfds_data_dir!r}); prepare it beforehand "
        f"(tfds build / builder.download_and_prepare() with file_format='array_record') -- this pipeline "
        f"never downloads")
  if builder.is_prepared():
    base_split = split.split("[")[0]
    if base_split not in builder.info.splits:
      raise ValueError(f"config.input.source: split {split!r} not in {name!r}; available: "
                       f"{sorted(builder.info.splits)}")
  return builder


def _tfds_source(c):
  import tensorflow_datasets as tfds  # seconds to import: only tfds: sources pay it
  name, split = schema.parse_source(c.source)[1]
  builder = _tfds_builder(c)
  if not builder.is_prepared():  # only shapes_world gets here: generated locally
    builder.download_and_prepare()
  try:
    return tfds.data_source(name, split=split, data_dir=c.tfds_data_dir or None, download=False)
  except Exception as e:
    raise ValueError(f"config.input.source: cannot read TFDS {name!r} split {split!r} with "
                     f"tfds.data_source (needs array_record files): {type(e).__name__}: {e}") from None


def make_source(input_config):
  """The grain random-access source of ``config.input.source`` (unshuffled)."""
  c = schema.with_input_defaults(input_config)
  kind, detail = schema.parse_source(c.source)
  if kind == "shapes_world":
    return ShapesWorldSource(c.image_size, c.num_examples, c.data_seed, tasks=c.shapes_world_tasks)
  if kind == "tfds":
    return _tfds_source(c)
  if kind == "folder":
    if class_folders(detail):
      return class_folder_source(detail, c.skip_bad_examples)
    return ImageCaptionFiles(_folder_pairs(detail, c))
  if kind == "latents":
    check_source(c)
    return latents.latents_source(detail)
  return ImageCaptionFiles(_read_jsonl(detail, detail.parent, (c.image_key,), (c.caption_key,)))


# ----------------------------------------------------------------------------
# The held-out examples (ec_dit.training.heldout): never in the training stream


def held_out_count(input_config, length: int, num_examples: int) -> int:
  """How many of a source's `length` records are held out of training for a held-out set of `num_examples`.

  ShapesWorld: none (its held-out examples are the indices past `config.input.num_examples`,
  which training never draws). Other sources: their last min(num_examples, length // 10)
  records, so a small folder still trains on 90% of itself.
  """
  kind, _ = schema.parse_source(schema.with_input_defaults(input_config).source)
  return 0 if kind == "shapes_world" else min(int(num_examples), int(length) // 10)


def held_out_source(input_config, num_examples: int):
  """(source, indices) of the held-out examples: ShapesWorld indices [num_examples, num_examples + n) of the
  training seed; for other sources the last `held_out_count` records (which `create_dataset` leaves out)."""
  c = schema.with_input_defaults(input_config)
  kind, _ = schema.parse_source(c.source)
  if kind == "shapes_world":
    source = ShapesWorldSource(c.image_size, c.num_examples + int(num_examples), c.data_seed,
                               tasks=c.shapes_world_tasks)
    return source, range(c.num_examples, c.num_examples + int(num_examples))
  source = make_source(c)
  k = held_out_count(c, len(source), num_examples)
  return source, range(len(source) - k, len(source))

