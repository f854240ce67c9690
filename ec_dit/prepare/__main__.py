"""`python -m ec_dit.prepare`: encode a dataset once into VAE latent statistics and T5 features.

  python -m ec_dit.prepare --config=configs/ec_dit_xl.py --source=folder:IMAGES --out=DATA \\
      --config.encoders.t5_path=T5 --config.encoders.vae_path=VAE

Reads any source `config.input.source` accepts (`folder:`, `jsonl:`, `tfds:`,
`shapes_world`), centre-crops and resizes to `config.input.image_size`, and
writes ArrayRecord shards, `skipped.jsonl` and `manifest.json` to `--out`
(`ec_dit.prepare.writer`). Rerunning the same command continues a killed run.
Several processes (`--coordinator_address`, `--num_processes`, `--process_id`,
or a TPU pod slice) each encode a disjoint slice of the shards.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
from absl import app, flags, logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from ml_collections import config_flags

from ec_dit import distributed, schema
from ec_dit.data import sources
from ec_dit.encoders.frozen import FrozenEncoders
from ec_dit.prepare import writer

config_flags.DEFINE_config_file("config", None, "Config file (its input, model.context_len and encoders).",
                                lock_config=True)
flags.DEFINE_string("source", None, "Overrides config.input.source: folder:PATH, jsonl:PATH, tfds:NAME, ...")
flags.DEFINE_string("out", None, "Output folder for the shards and manifest.json.")
flags.DEFINE_integer("examples_per_shard", 1024, "Source examples per shard (the unit of resumption).")
flags.DEFINE_integer("min_image_size", None, "Skip images whose shorter side is smaller "
                     "(default: a quarter of config.input.image_size).")
flags.DEFINE_integer("max_shards", None, "Stop after writing this many shards (rerun to continue).")
flags.DEFINE_string("coordinator_address", None, "Multi-process: HOST:PORT of process 0's coordinator.")
flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index in [0, num_processes).")
FLAGS = flags.FLAGS


def local_mesh() -> Mesh:
  """Data parallelism over this process's devices: each process encodes its own shards."""
  devices = np.asarray(jax.local_devices()).reshape(-1, 1, 1, 1)
  return Mesh(devices, schema.MESH_AXES)


def manifest_fields(config, encoders: FrozenEncoders, source: str) -> dict:
  return {
      "source": source,
      "image_size": int(config.input.image_size),
      "latent_shape": list(encoders.latent_shape(config.input.image_size)),
      "latent_dtype": "bfloat16",
      "feature_dim": encoders.feature_dim,
      "feature_dtype": "bfloat16",
      "context_len": int(config.model.context_len),
      "scaling_factor": encoders.info["vae"]["scaling_factor"],
      "shift_factor": encoders.info["vae"]["shift_factor"],
      "encoders": encoders.info,
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  if not FLAGS.out:
    raise app.UsageError("--out is required: the folder to write the shards and manifest.json to")
  config = FLAGS.config
  if FLAGS.source:
    with config.unlocked():
      config.input.source = FLAGS.source
  c = schema.validate_input(config.input)
  if schema.parse_source(c.source)[0] == "latents":
    raise app.UsageError(f"--source: prepare reads images and captions, not a prepared folder ({c.source!r})")
  sources.check_source(c)
  min_size = FLAGS.min_image_size if FLAGS.min_image_size is not None else c.image_size // 4
  try:
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  # -- Encoders (frozen), placed on this process's devices ------------------
  encoders = FrozenEncoders(config.encoders, context_len=config.model.context_len, mesh=local_mesh())
  fields = manifest_fields(config, encoders, c.source)  # also checks image_size against the VAE
  # -- Encode this process's shards -------------------------------------------
  source = sources.make_source(c)
  result = writer.prepare_shards(
      source, FLAGS.out, encoders=encoders, image_size=c.image_size, min_image_size=min_size,
      examples_per_shard=FLAGS.examples_per_shard, batch_size=config.encoders.batch_size,
      process_index=jax.process_index(), process_count=jax.process_count(), max_shards=FLAGS.max_shards,
      keys={"image_key": c.image_key, "caption_key": c.caption_key}, progress=jax.process_index() == 0)
  print(json.dumps({"process": jax.process_index(), **result}), flush=True)
  # -- Manifest, once every process is done --------------------------------------
  done = multihost_utils.process_allgather(np.int32(result["complete"])) if jax.process_count() > 1 else [
      int(result["complete"])]
  if not all(int(d) for d in np.ravel(done)):
    print("prepare: not complete yet (--max_shards, or another process stopped early); rerun to continue",
          file=sys.stderr, flush=True)
    return
  if jax.process_index() == 0:
    manifest = writer.write_manifest(FLAGS.out, num_source_examples=len(source),
                                     examples_per_shard=FLAGS.examples_per_shard, fields=fields)
    print(json.dumps({k: manifest[k] for k in ("num_examples", "skipped", "truncated", "bytes_per_example")}),
          flush=True)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("ec_dit.prepare done")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
