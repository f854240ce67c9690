"""Training input pipeline: grain over image-caption sources, sharded per process.

The ``config.input`` section (``ec_dit.schema.input_defaults``) names a source
(its forms: :mod:`ec_dit.data.sources`).

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

from typing import Any, Mapping, Sequence

import grain
import grain.checkpoint as grain_checkpoint
import jax
import numpy as np
from absl import flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ec_dit import schema
from ec_dit.data import latents, preprocess, sources
from ec_dit.data.preprocess import Tokenize


def create_dataset(input_config, *, batch_size: int, tokenize: Tokenize | None, seed: int,
                   process_index: int = 0, process_count: int = 1,
                   num_epochs: int | None = None, context_len: int | None = None,
                   holdout: int = 0) -> grain.IterDataset:
  """This process's stream of training batches.

  Args:
    input_config: the ``config.input`` section (missing keys take
      :func:`input_defaults`); checked with :func:`sources.check_input_and_source`.
    batch_size: the global batch size; must be divisible by
      ``process_count``. Each process yields ``batch_size // process_count``.
    tokenize: ``caption -> (np.int32 [L], np.bool_ [L])`` (the text
      tokenizer; must be picklable when ``worker_count > 0``); unused (None)
      for a ``latents:`` source.
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
    context_len: ``latents:`` sources: text features are padded to this many
      tokens (default: the prepared context length).
    holdout: ``config.heldout.num_examples``: a source other than ShapesWorld
      leaves out its last ``sources.held_out_count`` records (the held-out set,
      :func:`held_out_examples`); ShapesWorld's held-out examples lie past
      ``num_examples`` and never enter the stream anyway.

  Returns:
    A ``grain.IterDataset`` of ``{"image": float32 [b, H, W, 3] in [-1, 1],
    "tokens": int32 [b, L], "mask": bool [b, L]}`` (plus ``"bad": int32 [b]``,
    1 for a row whose example was bad and replaced, with
    ``config.input.skip_bad_examples``); for a ``latents:`` source
    ``{"latent_mean", "latent_std": float32 [b, h, w, c] (scaled as the model
    sees latents), "features": float32 [b, L, d], "mask", "label"}``. Same config and seed give
    identical batches; its iterators support ``get_state`` / ``set_state`` and
    Orbax checkpointing (:func:`iterator_save_args`).
  """
  c = schema.with_input_defaults(input_config)
  sources.check_input_and_source(c)
  if not schema.is_int(process_count) or process_count < 1:
    raise ValueError(f"process_count must be a positive integer, got {process_count!r}")
  if not schema.is_int(process_index) or not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, process_count={process_count}), got {process_index!r}")
  if not schema.is_int(batch_size) or batch_size < 1 or batch_size % process_count:
    raise ValueError(f"batch_size (global) must be a positive multiple of process_count={process_count}, "
                     f"got {batch_size!r}")
  if not schema.is_int(seed) or not 0 <= seed < 2**32:
    raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
  if num_epochs is not None and (not schema.is_int(num_epochs) or num_epochs < 1):
    raise ValueError(f"num_epochs must be None (repeat forever) or a positive integer, got {num_epochs!r}")
  local_batch = batch_size // process_count

  source = sources.make_source(c)
  if len(source) == 0:
    raise ValueError(f"config.input.source: {c.source!r} has no examples")
  skip_source = source if c.skip_bad_examples else None
  ds = grain.MapDataset.source(preprocess.Indexed(source) if skip_source is not None else source)
  held = sources.held_out_count(c, len(source), holdout) if holdout else 0
  if held:
    ds = ds[:len(source) - held]
  if c.shuffle:
    ds = ds.shuffle(seed=seed)  # index >= len reshuffles with seed + epoch
  ds = ds.repeat(num_epochs)
  kind, folder = schema.parse_source(c.source)
  if kind == "latents":
    manifest = latents.read_manifest(folder)
    ds = ds.map(latents.DecodeLatents(context_len or manifest["context_len"], manifest["scaling_factor"],
                                      manifest["shift_factor"]))
  else:
    ds = ds.map(preprocess.Preprocess(c.image_size, tokenize, c.image_key, c.caption_key, source=skip_source))
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
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside app.run use their defaults
      flags.FLAGS.mark_as_parsed()
    out = out.mp_prefetch(grain.MultiprocessingOptions(num_workers=c.worker_count))
  return out


def held_out_examples(input_config, num_examples: int, *, tokenize: Tokenize | None,
                      context_len: int | None = None) -> dict[str, np.ndarray]:
  """The held-out examples (``sources.held_out_source``), decoded as training decodes them, stacked:
  ``{"image", "tokens", "mask"}`` (pixels) or ``{"latent_mean", "latent_std", "features", "mask", "label"}``
  (prepared latents), each [n, ...] in source order, or ``{}`` when the source is too small to hold any
  record out (at most a tenth is held out). The same config always gives the same arrays."""
  c = schema.with_input_defaults(input_config)
  source, indices = sources.held_out_source(c, num_examples)
  kind, folder = schema.parse_source(c.source)
  if kind == "latents":
    manifest = latents.read_manifest(folder)
    decode = latents.DecodeLatents(context_len or manifest["context_len"], manifest["scaling_factor"],
                                   manifest["shift_factor"])
  else:
    decode = preprocess.Preprocess(c.image_size, tokenize, c.image_key, c.caption_key)
  rows = [decode.map(source[i]) for i in indices]
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]} if rows else {}


# ----------------------------------------------------------------------------
# Checkpointing and global batches


def iterator_save_args(it):
  """Orbax save args for a grain iterator: an item of ``ocp.args.Composite``.

  ``manager.save(step, args=ocp.args.Composite(state=..., data_iter=iterator_save_args(it)))``.
  The iterator state is read synchronously inside ``manager.save`` (grain's
  handler is not async), so advancing ``it`` afterwards is safe even with async
  checkpointing.
  """
  return grain_checkpoint.CheckpointSave(it)


def iterator_restore_args(it):
  """Orbax restore args: ``it`` (a fresh iterator of the same dataset) is set to the saved state.

  ``manager.restore(step, args=ocp.args.Composite(..., data_iter=iterator_restore_args(it)))``
  returns ``it`` (restored, prefetch started) under ``data_iter``.
  """
  return grain_checkpoint.CheckpointRestore(it)


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
