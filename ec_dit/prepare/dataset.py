"""`prepare_dataset(config, out)`: a config's source, encoded by its frozen encoders into `out`.

The library entry point behind `python -m ec_dit.prepare` (see `ec_dit.prepare.writer`
for the shard layout, resumption and the handling of bad input).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from ec_dit import schema, tasks, workdir_lock
from ec_dit.data import sources
from ec_dit.encoders.frozen import FrozenEncoders
from ec_dit.prepare import state, writer


def local_mesh() -> Mesh:
  """Data parallelism over this process's devices: each process encodes its own shards."""
  return Mesh(np.asarray(jax.local_devices()).reshape(-1, 1, 1, 1), schema.MESH_AXES)


def needs_text(config) -> bool:
  """Whether prepare encodes captions with T5: the task's `needs_text_encoder` (not for a class-conditional
  config, whose records hold latents and labels only: empty features, `feature_dim` 0 in the manifest)."""
  return tasks.task_for(config).needs_text_encoder


def manifest_fields(config, encoders: FrozenEncoders, source: str) -> dict:
  """What the manifest records beside the counts: shapes, dtypes, scaling, encoders."""
  return {
      "source": source,
      "image_size": int(config.input.image_size),
      "latent_shape": list(encoders.latent_shape(config.input.image_size)),
      "latent_dtype": "bfloat16",
      "feature_dim": encoders.feature_dim if encoders.t5 is not None else 0,
      "feature_dtype": "bfloat16",
      "context_len": int(config.model.context_len),
      "scaling_factor": encoders.info["vae"]["scaling_factor"],
      "shift_factor": encoders.info["vae"]["shift_factor"],
      "encoders": encoders.info,
  }


def _lock(out: str) -> workdir_lock.Lock | None:
  """Process 0 takes `out`'s lock (the one training takes); every process learns whether it got it."""
  lock, error = None, None
  if jax.process_index() == 0:
    os.makedirs(out, exist_ok=True)
    try:
      lock = workdir_lock.Lock(out, report=lambda m: print(f"prepare: {m}", file=sys.stderr, flush=True))
    except workdir_lock.WorkdirError as e:
      error = e
  failed = np.int32(error is not None)
  if jax.process_count() > 1:
    failed = np.max(multihost_utils.process_allgather(failed))
  if error is not None:
    raise error
  if failed:
    raise workdir_lock.WorkdirError(f"process 0 could not lock {out} (see its log)")
  return lock


def check_encoders_fit_model(config, fields: dict) -> None:
  """The VAE's latent grid and the T5's width (`manifest_fields`) must be what `config.model` trains on;
  a ValueError naming the field, what the encoder gives and how to fix it, otherwise."""
  m, e, size = config.model, config.encoders, int(config.input.image_size)
  h, _, channels = fields["latent_shape"]
  if (h, channels) != (m.input_size, m.in_channels):
    factor = size // h
    raise ValueError(
        f"config.model.input_size/in_channels: the VAE in {e.vae_path} turns config.input.image_size={size} "
        f"images into {h}x{h}x{channels} latents ({factor}x downsampling), but the model takes "
        f"{m.input_size}x{m.input_size}x{m.in_channels}; nothing was encoded. Set config.input.image_size="
        f"{m.input_size * factor}, or use the config's model with this VAE (input_size={h}, in_channels={channels})")
  if needs_text(config) and fields["feature_dim"] != m.context_dim:
    raise ValueError(f"config.model.context_dim: the T5 encoder in {e.t5_path} gives {fields['feature_dim']}-wide "
                     f"features, but the model's context_dim is {m.context_dim}; nothing was encoded. Set "
                     f"--config.model.context_dim={fields['feature_dim']} or use the T5 the config was made for")


def prepare_dataset(config, out: str, *, examples_per_shard: int = 1024, min_image_size: int | None = None,
                    max_shards: int | None = None, encoders: FrozenEncoders | None = None,
                    max_image_pixels: int = writer.MAX_IMAGE_PIXELS) -> dict | None:
  """Encodes `config.input.source` into `out`; returns the manifest, or None while shards remain.

  Every process (`jax.process_index()` of `jax.process_count()`) encodes its own
  shards on its local devices; process 0 writes the manifest once all are complete.
  `min_image_size` defaults to a quarter of `config.input.image_size`. A class-conditional
  config (`needs_text`) needs no T5: only the VAE is loaded.

  `out` is locked like a training workdir (one job at a time); a start that fails before
  any shard is written removes `out` if it made it. Before anything is
  written, the fingerprint of what determines the shards (`ec_dit.prepare.state`:
  encoder files, examples_per_shard, image size, caption length, image limits, the
  source listing) is compared with the one `out` was started with: any difference
  raises PrepareError listing old -> new.
  """
  c = schema.validate_input(config.input)
  sources.check_source(c)
  if examples_per_shard < 1:
    raise ValueError(f"--examples_per_shard must be >= 1, got {examples_per_shard}")
  if max_image_pixels < 1:
    raise ValueError(f"--max_image_pixels must be >= 1, got {max_image_pixels}")
  min_size = c.image_size // 4 if min_image_size is None else min_image_size
  created = jax.process_index() == 0 and not os.path.exists(out)
  lock, done = _lock(out), False
  try:
    result = _prepare(config, c, out, examples_per_shard, min_size, max_shards, encoders, max_image_pixels)
    done = True
    return result
  finally:
    if lock is not None:
      lock.release()
    if not done and created and not writer.has_shards(out):  # a failed start leaves no folder it made
      shutil.rmtree(out, ignore_errors=True)


def _prepare(config, c, out, examples_per_shard, min_size, max_shards, encoders, max_image_pixels):
  # -- The fingerprint, checked against the folder's before anything is written or loaded ------
  source = sources.make_source(c)
  fp = state.fingerprint(config, c, source, examples_per_shard=examples_per_shard, min_image_size=min_size,
                         max_image_pixels=max_image_pixels, need_t5=needs_text(config))
  state.check_resume(out, fp, writer.has_shards(out))
  if jax.process_count() > 1:  # every process has compared before process 0 records
    multihost_utils.sync_global_devices("ec_dit.prepare state checked")
  if jax.process_index() == 0:
    state.record(out, fp)
  # -- Encoders (frozen), placed on this process's devices ------------------------
  encoders = encoders or FrozenEncoders.from_config(config.encoders, context_len=config.model.context_len,
                                                   need_t5=needs_text(config), mesh=local_mesh())
  fields = dict(manifest_fields(config, encoders, c.source), fingerprint=fp)  # also checks image_size vs the VAE
  check_encoders_fit_model(config, fields)  # before anything is encoded or written
  # -- Encode this process's shards ------------------------------------------------
  result = writer.prepare_shards(
      source, out, encoders=encoders, image_size=c.image_size, min_image_size=min_size,
      examples_per_shard=examples_per_shard, batch_size=config.encoders.batch_size,
      process_index=jax.process_index(), process_count=jax.process_count(), max_shards=max_shards,
      keys={"image_key": c.image_key, "caption_key": c.caption_key}, progress=jax.process_index() == 0,
      max_image_pixels=max_image_pixels)
  print(json.dumps({"process": jax.process_index(), **result}), flush=True)
  # -- Manifest, once every process is done ----------------------------------------
  complete = np.int32(result["complete"])
  if jax.process_count() > 1:
    complete = np.min(multihost_utils.process_allgather(complete))
  manifest = None
  if not complete:
    print("prepare: not complete yet (--max_shards, or another process stopped early); rerun to continue",
          file=sys.stderr, flush=True)
  elif jax.process_index() == 0:
    manifest = writer.write_manifest(out, num_source_examples=len(source), examples_per_shard=examples_per_shard,
                                     fields=fields)
    print(json.dumps({k: manifest[k] for k in ("num_examples", "skipped", "truncated", "bytes_per_example")}),
          flush=True)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("ec_dit.prepare done")
  return manifest
