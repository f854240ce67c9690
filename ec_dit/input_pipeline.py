"""Training input pipeline: grain over image-caption sources, sharded per process.

The ``config.input`` section (:func:`input_defaults`) names a source:

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
  same-stem ``.txt`` caption beside each, or a ``captions.jsonl`` /
  ``metadata.jsonl`` in ``PATH`` whose lines name the image (``file_name`` or
  ``image_key``, relative to ``PATH``) and its caption (``caption_key`` or
  ``text``).
* ``"jsonl:PATH"`` -- lines ``{"image": path, "caption": str}`` (keys
  ``image_key`` / ``caption_key``); relative image paths are relative to the
  JSONL file's folder.

:func:`create_dataset` turns a source into an infinite (or ``num_epochs``)
stream of per-process batches ``{"image": float32 [b, H, W, 3] in [-1, 1],
"tokens": int32 [b, L], "mask": bool [b, L]}``. Order of operations, all on
a lazy random-access ``grain.MapDataset`` so a process only reads and decodes
the examples it yields:

  source -> shuffle(seed) (reshuffled every epoch) -> repeat(num_epochs)
  -> map(decode, RGB, centre crop, resize, scale, tokenize)
  -> batch(batch_size // process_count) -> [process_index::process_count]
  -> to_iter_dataset(ReadOptions) [-> mp_prefetch(worker_count)]

Because the global stream is cut into per-process chunks that are dealt out
round-robin, the concatenation over processes of their ``j``-th batches (the
global batch :func:`global_batch` assembles) is exactly the ``j``-th batch of a
single-process run with the same seed: the data a step sees does not depend on
the number of hosts.

Checkpointing: the iterator of the returned dataset has ``get_state`` /
``set_state``; inside an Orbax ``CheckpointManager`` save it as an item of
``ocp.args.Composite`` with :func:`iterator_save_args` and restore it with
:func:`iterator_restore_args` (grain's ``grain.checkpoint.CheckpointSave`` /
``CheckpointRestore``; one JSON file per process, named by
``jax.process_index()``). The handler is synchronous, so the state is captured
when ``manager.save`` is called, also with async checkpointing.
"""
from __future__ import annotations

import io
import json
import os
import pathlib
import re
from typing import Any, Callable, Mapping, Sequence

import grain
import ml_collections
import numpy as np
from PIL import Image

from ec_dit.config_lib import is_int
from ec_dit.data.shapes_world import CAPTION_TASKS, ShapesWorldSource

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FOLDER_CAPTION_FILES = ("captions.jsonl", "metadata.jsonl")
SOURCE_FORMS = ('"shapes_world"', '"tfds:NAME[/CONFIG][:VERSION][:SPLIT]"', '"folder:PATH"', '"jsonl:PATH"')
MIN_IMAGE_SIZE = 8
# Datasets that may be generated on first use (locally, no download).
LOCALLY_GENERATED_TFDS = ("shapes_world",)

Tokenize = Callable[[str], tuple[np.ndarray, np.ndarray]]


def input_defaults() -> ml_collections.ConfigDict:
  """The ``config.input`` section with its defaults.

  Fields:
    source: where examples come from (forms in the module docstring).
    image_size: output height = width in pixels (resize + centre crop for
      file/TFDS sources; ShapesWorld renders at this size).
    num_examples: ShapesWorld only: length of the procedural source (an
      epoch).
    data_seed: ShapesWorld only: the procedural seed (which scenes exist);
      the shuffle order is the ``seed`` given to :func:`create_dataset`.
    shapes_world_tasks: ShapesWorld only: the caption tasks, drawn uniformly
      (a task listed twice is drawn twice as often); any of
      ``ec_dit.data.shapes_world.CAPTION_TASKS``.
    shuffle: shuffle the examples (reshuffled every epoch).
    worker_count: grain worker processes (``mp_prefetch``); 0 keeps
      everything in-process (deterministic, CI-friendly).
    read_threads: threads preparing batches in each process (0 = the
      consumer's thread).
    prefetch_buffer_size: batches prepared ahead per process.
    tfds_data_dir: TFDS data dir (``""`` = TFDS's default).
    image_key / caption_key: feature names of the image and caption (TFDS,
      JSONL and folder ``*.jsonl`` records).
  """
  return ml_collections.ConfigDict(dict(
      source="shapes_world",
      image_size=32,
      num_examples=1_000_000,
      data_seed=0,
      shapes_world_tasks=CAPTION_TASKS,  # the six GenEval templates and "descriptive"
      shuffle=True,
      worker_count=0,
      read_threads=2,
      prefetch_buffer_size=4,
      tfds_data_dir="",
      image_key="image",
      caption_key="caption",
  ))


# ----------------------------------------------------------------------------
# Validation


def _fail(field: str, allowed: str, got: Any):
  raise ValueError(f"config.input.{field}: must be {allowed}, got {got!r}")


def parse_source(source: str) -> tuple[str, Any]:
  """Splits ``config.input.source`` into ``(kind, detail)``.

  Returns ``("shapes_world", None)``, ``("tfds", (name, split))``,
  ``("folder", Path)`` or ``("jsonl", Path)``; raises ValueError naming
  ``config.input.source`` for anything else.
  """
  allowed = "one of " + ", ".join(SOURCE_FORMS)
  if not isinstance(source, str):
    _fail("source", allowed, source)
  if source == "shapes_world":
    return "shapes_world", None
  kind, sep, rest = source.partition(":")
  if not sep or kind not in ("tfds", "folder", "jsonl") or not rest.strip():
    _fail("source", allowed, source)
  if kind == "tfds":
    name, _, split = rest.partition(":")
    m = re.match(r"^(\d+\.\d+\.\d+)(?::(.*))?$", split)
    if m:  # NAME:VERSION[:SPLIT]
      name, split = f"{name}:{m.group(1)}", m.group(2) or ""
    if not re.match(r"^[A-Za-z0-9_]+(/[A-Za-z0-9_.\-]+)?(:\d+\.\d+\.\d+)?$", name):
      _fail("source", f"{allowed} with a TFDS dataset name like 'mnist' or 'shapes_world/size32'", source)
    return "tfds", (name, split or "train")
  return kind, pathlib.Path(os.path.expanduser(rest))


def validate_input(input_config) -> None:
  """Checks ``config.input`` before anything is built or compiled.

  Raises ValueError naming the first bad field (``config.input.source: ...``)
  and what is allowed: unknown keys, a bad source form, a missing folder /
  JSONL file / image folder without images, a TFDS dataset that is not
  prepared in ``tfds_data_dir`` (except ``shapes_world``, generated locally),
  ``image_size < 8``, non-positive counts, bad seeds or keys.
  """
  schema = input_defaults()
  for key in input_config.keys():
    if key not in schema:
      raise ValueError(f"config.input.{key}: unknown key; allowed keys here are {sorted(schema.keys())}")
  c = ml_collections.ConfigDict(dict(schema.to_dict(), **dict(input_config.items())))
  if not is_int(c.image_size) or c.image_size < MIN_IMAGE_SIZE:
    _fail("image_size", f"an integer >= {MIN_IMAGE_SIZE}", c.image_size)
  if not is_int(c.num_examples) or c.num_examples < 1:
    _fail("num_examples", "a positive integer", c.num_examples)
  if not is_int(c.data_seed) or not 0 <= c.data_seed < 2**32:
    _fail("data_seed", "an integer in [0, 2**32)", c.data_seed)
  tasks = c.shapes_world_tasks
  if (isinstance(tasks, str) or not isinstance(tasks, Sequence) or not tasks
      or any(t not in CAPTION_TASKS for t in tasks)):
    _fail("shapes_world_tasks", f"a non-empty sequence of {CAPTION_TASKS}", tasks)
  if not isinstance(c.shuffle, bool):
    _fail("shuffle", "True or False", c.shuffle)
  for name in ("worker_count", "read_threads"):
    if not is_int(c[name]) or c[name] < 0:
      _fail(name, "an integer >= 0", c[name])
  if not is_int(c.prefetch_buffer_size) or c.prefetch_buffer_size < 1:
    _fail("prefetch_buffer_size", "a positive integer", c.prefetch_buffer_size)
  for name in ("image_key", "caption_key"):
    if not isinstance(c[name], str) or not c[name]:
      _fail(name, "a non-empty string", c[name])
  if not isinstance(c.tfds_data_dir, str):
    _fail("tfds_data_dir", "a string ('' = TFDS default)", c.tfds_data_dir)
  kind, detail = parse_source(c.source)
  if kind == "folder":
    if not detail.is_dir():
      _fail("source", "'folder:PATH' with an existing folder", c.source)
    if not _folder_images(detail):
      _fail("source", f"'folder:PATH' with image files ({', '.join(IMAGE_EXTENSIONS)})", c.source)
  elif kind == "jsonl":
    if not detail.is_file():
      _fail("source", "'jsonl:PATH' with an existing JSONL file", c.source)
  elif kind == "tfds":
    _tfds_builder(c)  # raises if unknown or not prepared


# ----------------------------------------------------------------------------
# Sources


class ImageCaptionFiles:
  """grain random-access source over ``(image path, caption)`` pairs.

  ``source[i]`` is ``{"image": str path, "caption": str}``; images are read
  and decoded by the pipeline's map, in the reading thread/worker.
  """

  def __init__(self, pairs: Sequence[tuple[str, str]]):
    self.pairs = list(pairs)

  def __len__(self) -> int:
    return len(self.pairs)

  def __getitem__(self, index: int) -> dict:
    path, caption = self.pairs[int(index)]
    return {"image": path, "caption": caption}

  def __repr__(self) -> str:
    return f"ImageCaptionFiles({len(self.pairs)} pairs)"


def _folder_images(folder: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _read_jsonl(path: pathlib.Path, base: pathlib.Path, image_keys: Sequence[str],
                caption_keys: Sequence[str]) -> list[tuple[str, str]]:
  pairs = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
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
    pairs.append((str(img), txt.read_text(encoding="utf-8").strip()))
  if not pairs:
    raise ValueError(f"config.input.source: folder {folder} has no image files ({', '.join(IMAGE_EXTENSIONS)})")
  return pairs


def _tfds_builder(c):
  """The TFDS builder of a ``tfds:`` source; raises ValueError if unusable."""
  import tensorflow_datasets as tfds
  import ec_dit.data.shapes_world_tfds  # noqa: F401  (registers 'shapes_world')
  name, split = parse_source(c.source)[1]
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
  import tensorflow_datasets as tfds
  name, split = parse_source(c.source)[1]
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
  c = input_config
  kind, detail = parse_source(c.source)
  if kind == "shapes_world":
    return ShapesWorldSource(c.image_size, c.num_examples, c.data_seed, tasks=c.shapes_world_tasks)
  if kind == "tfds":
    return _tfds_source(c)
  if kind == "folder":
    return ImageCaptionFiles(_folder_pairs(detail, c))
  return ImageCaptionFiles(_read_jsonl(detail, detail.parent, (c.image_key,), (c.caption_key,)))


# ----------------------------------------------------------------------------
# Per-example preprocessing


def to_rgb(img: Image.Image) -> Image.Image:
  """RGB version of a PIL image; transparent pixels are composited on white."""
  if img.mode == "P":
    img = img.convert("RGBA" if "transparency" in img.info else "RGB")
  if img.mode in ("RGBA", "LA", "RGBa", "La"):
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits
    a = np.asarray(img, np.float64)
    img = Image.fromarray(np.clip(a / 257.0, 0, 255).astype(np.uint8))
  return img.convert("RGB")


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
  """Centre square crop (side = the shorter side), then bicubic resize to ``size``."""
  w, h = img.size
  s = min(w, h)
  if (w, h) != (s, s):
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s))
  if s != size:
    img = img.resize((size, size), Image.Resampling.BICUBIC)
  return img


def load_image(image: Any, size: int) -> np.ndarray:
  """uint8 ``(size, size, 3)`` from a path, encoded bytes or an array (HW, HW1, HW3, HW4)."""
  if isinstance(image, (str, os.PathLike)):
    with Image.open(image) as f:
      pil = to_rgb(f)
  elif isinstance(image, (bytes, np.bytes_)):
    with Image.open(io.BytesIO(bytes(image))) as f:
      pil = to_rgb(f)
  else:
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] == 3 and a.dtype == np.uint8 and a.shape[:2] == (size, size):
      return a  # fast path: already the right size (ShapesWorld)
    if a.ndim == 3 and a.shape[-1] == 1:
      a = a[..., 0]
    if a.dtype != np.uint8 or a.ndim not in (2, 3):
      raise ValueError(f"image array must be uint8 HxW[xC], got {a.dtype} {a.shape}")
    pil = to_rgb(Image.fromarray(a))
  return np.asarray(center_crop_resize(pil, size), np.uint8)


class Preprocess(grain.transforms.Map):
  """Example -> ``{"image": float32 [H, W, 3] in [-1, 1], "tokens": int32 [L], "mask": bool [L]}``."""

  def __init__(self, image_size: int, tokenize: Tokenize, image_key: str = "image",
               caption_key: str = "caption"):
    self.image_size, self.tokenize = int(image_size), tokenize
    self.image_key, self.caption_key = image_key, caption_key

  def map(self, example: Mapping[str, Any]) -> dict:
    for key in (self.image_key, self.caption_key):
      if key not in example:
        field = "image_key" if key == self.image_key else "caption_key"
        raise KeyError(f"config.input.{field}: example has no feature {key!r}; it has {sorted(example)}")
    image = load_image(example[self.image_key], self.image_size)
    caption = example[self.caption_key]
    if isinstance(caption, np.ndarray) and caption.ndim == 0:
      caption = caption.item()
    if isinstance(caption, (bytes, np.bytes_)):
      caption = bytes(caption).decode("utf-8")
    tokens, mask = self.tokenize(str(caption))
    return {
        "image": image.astype(np.float32) / np.float32(127.5) - np.float32(1.0),
        "tokens": np.asarray(tokens, np.int32),
        "mask": np.asarray(mask, np.bool_),
    }


# ----------------------------------------------------------------------------
# Dataset


def create_dataset(input_config, *, batch_size: int, tokenize: Tokenize, seed: int,
                   process_index: int = 0, process_count: int = 1,
                   num_epochs: int | None = None) -> grain.IterDataset:
  """This process's stream of training batches.

  Args:
    input_config: the ``config.input`` section (missing keys take
      :func:`input_defaults`); validated with :func:`validate_input`.
    batch_size: the global batch size; must be divisible by
      ``process_count``. Each process yields ``batch_size // process_count``.
    tokenize: ``caption -> (np.int32 [L], np.bool_ [L])`` (the text
      tokenizer; must be picklable when ``worker_count > 0``).
    seed: shuffle seed (``0 <= seed < 2**32``); each epoch is reshuffled.
    process_index, process_count: this process's shard (``jax.process_index()``,
      ``jax.process_count()``). Process ``p`` reads and decodes only the
      examples of its own batches: local batch ``j`` of process ``p`` is
      positions ``[(j * P + p) * b, (j * P + p + 1) * b)`` of the shuffled
      global stream, so concatenating the processes' ``j``-th batches gives
      exactly the ``j``-th batch of a single-process run.
    num_epochs: ``None`` = repeat forever (training); else the number of
      passes over the source (the tail that does not fill a global batch is
      dropped, so every process yields the same number of batches).

  Returns:
    A ``grain.IterDataset`` of ``{"image": float32 [b, H, W, 3] in [-1, 1],
    "tokens": int32 [b, L], "mask": bool [b, L]}``. Same config and seed give
    identical batches; its iterators support ``get_state`` / ``set_state`` and
    Orbax checkpointing (:func:`iterator_save_args`).
  """
  c = ml_collections.ConfigDict(dict(input_defaults().to_dict(), **dict(input_config.items())))
  validate_input(c)
  if not is_int(process_count) or process_count < 1:
    raise ValueError(f"process_count must be a positive integer, got {process_count!r}")
  if not is_int(process_index) or not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, process_count={process_count}), got {process_index!r}")
  if not is_int(batch_size) or batch_size < 1 or batch_size % process_count:
    raise ValueError(f"batch_size (global) must be a positive multiple of process_count={process_count}, "
                     f"got {batch_size!r}")
  if not is_int(seed) or not 0 <= seed < 2**32:
    raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
  if num_epochs is not None and (not is_int(num_epochs) or num_epochs < 1):
    raise ValueError(f"num_epochs must be None (repeat forever) or a positive integer, got {num_epochs!r}")
  local_batch = batch_size // process_count

  source = make_source(c)
  if len(source) == 0:
    raise ValueError(f"config.input.source: {c.source!r} has no examples")
  ds = grain.MapDataset.source(source)
  if c.shuffle:
    ds = ds.shuffle(seed=seed)  # index >= len reshuffles with seed + epoch
  ds = ds.repeat(num_epochs)
  ds = ds.map(Preprocess(c.image_size, tokenize, c.image_key, c.caption_key))
  ds = ds.batch(local_batch, drop_remainder=True)  # chunks of the global stream
  if num_epochs is not None:
    usable = (len(ds) // process_count) * process_count
    if usable == 0:
      raise ValueError(f"{len(source)} examples x {num_epochs} epochs do not fill one global batch of "
                       f"{batch_size}")
    ds = ds[:usable]
  ds = ds[process_index::process_count]
  out = ds.to_iter_dataset(grain.ReadOptions(num_threads=c.read_threads,
                                             prefetch_buffer_size=c.prefetch_buffer_size))
  if c.worker_count > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside app.run use their defaults
      flags.FLAGS.mark_as_parsed()
    out = out.mp_prefetch(grain.MultiprocessingOptions(num_workers=c.worker_count))
  return out


# ----------------------------------------------------------------------------
# Checkpointing and global batches


def iterator_save_args(it):
  """Orbax save args for a grain iterator: an item of ``ocp.args.Composite``.

  ``manager.save(step, args=ocp.args.Composite(state=..., data_iter=iterator_save_args(it)))``.
  The iterator state is read synchronously inside ``manager.save`` (grain's
  handler is not async), so advancing ``it`` afterwards is safe even with async
  checkpointing.
  """
  import grain.checkpoint as gc
  return gc.CheckpointSave(it)


def iterator_restore_args(it):
  """Orbax restore args: ``it`` (a fresh iterator of the same dataset) is set to the saved state.

  ``manager.restore(step, args=ocp.args.Composite(..., data_iter=iterator_restore_args(it)))``
  returns ``it`` (restored, prefetch started) under ``data_iter``.
  """
  import grain.checkpoint as gc
  return gc.CheckpointRestore(it)


def global_batch(local_batch: Mapping[str, Any], mesh_or_sharding, batch_axes: Sequence[str] | None = None):
  """Assembles per-process batches into global ``jax.Array``s.

  Each leaf's leading (batch) axis is sharded over the data-like mesh axes and
  the other axes replicated; the global batch is the concatenation of the
  processes' local batches in process order (what :func:`create_dataset`
  yields with ``process_index=jax.process_index()``).

  Args:
    local_batch: pytree of numpy arrays with this process's ``b_local`` rows.
    mesh_or_sharding: a ``NamedSharding`` whose spec's first entry says the
      batch axes (e.g. ``NamedSharding(mesh, P(("data", "fsdp")))``; the rest
      of the spec is ignored), or a ``Mesh`` (batch over ``batch_axes``,
      default all its axes).
    batch_axes: mesh axes for the batch when a ``Mesh`` is given.

  Returns:
    The same pytree of global ``jax.Array``s with ``b_local * process_count``
    rows.
  """
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  if isinstance(mesh_or_sharding, NamedSharding):
    mesh = mesh_or_sharding.mesh
    spec = mesh_or_sharding.spec
    batch_spec = spec[0] if len(spec) else None
  elif isinstance(mesh_or_sharding, Mesh):
    mesh = mesh_or_sharding
    batch_spec = tuple(batch_axes) if batch_axes is not None else tuple(mesh.axis_names)
  else:
    raise TypeError(f"mesh_or_sharding must be a jax.sharding.NamedSharding or Mesh, got {mesh_or_sharding!r}")

  def put(x):
    x = np.asarray(x)
    sharding = NamedSharding(mesh, P(batch_spec, *([None] * (x.ndim - 1))))
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree.map(put, dict(local_batch) if isinstance(local_batch, Mapping) else local_batch)
