"""`python -m ec_dit.prepare`: encode a dataset once into VAE latent statistics and T5 features.

  python -m ec_dit.prepare --config=configs/ec_dit_xl.py --source=folder:IMAGES --out=DATA \\
      --config.encoders.t5_path=T5 --config.encoders.vae_path=VAE

Reads any source `config.input.source` accepts (`folder:`, `jsonl:`, `tfds:`,
`shapes_world`), centre-crops and resizes to `config.input.image_size`, and
writes ArrayRecord shards, `skipped.jsonl` and `manifest.json` to `--out`
(`ec_dit.prepare.writer`). Rerunning the same command continues a killed run.
Several processes (`--coordinator_address`, `--num_processes`, `--process_id`,
or a TPU pod slice) each encode a disjoint slice of the shards. Expected failures
are one line on stderr with exit code 2 (`ec_dit.errors`).
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from ec_dit import command_line, errors, schema
from ec_dit.data import sources
from ec_dit.prepare import dataset

config_flags.DEFINE_config_file("config", None, "Config file (its input, model.context_len and encoders).",
                                lock_config=True)
flags.DEFINE_string("source", None, "Overrides config.input.source: folder:PATH, jsonl:PATH, tfds:NAME, ...")
flags.DEFINE_string("out", None, "Output folder for the shards and manifest.json.")
flags.DEFINE_integer("examples_per_shard", 1024, "Source examples per shard (the unit of resumption).")
flags.DEFINE_integer("min_image_size", None, "Skip images whose shorter side is smaller "
                     "(default: a quarter of config.input.image_size).")
flags.DEFINE_integer("max_image_pixels", 36_000_000, "Skip (and list) images with more pixels, read from their "
                     "header before decoding (a small PNG can decode to gigabytes; Pillow warns only at 89M).")
flags.DEFINE_integer("max_shards", None, "Stop after writing this many shards (rerun to continue).")
flags.DEFINE_string("coordinator_address", None, "Multi-process: HOST:PORT of process 0's coordinator.")
flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index in [0, num_processes).")
FLAGS = flags.FLAGS


def main(argv):
  """Runs `run`; expected failures (bad input, a resume that does not match, a full disk) are one line, exit 2."""
  command_line.run_main(run, argv)  # an expected failure: one line, exit code 2


def run(argv):
  """Checks the flags and the source, then encodes (`ec_dit.prepare.dataset.prepare_dataset`)."""
  if not FLAGS.out:
    raise errors.UsageError("--out is required: the folder to write the shards and manifest.json to")
  config = FLAGS.config
  if FLAGS.source:
    config.input.source = FLAGS.source
  c = schema.validate_input(config.input)
  if schema.parse_source(c.source)[0] == "latents":
    raise errors.UsageError(f"--source: prepare reads images and captions, not a prepared folder ({c.source!r})")
  sources.check_source(c)
  command_line.initialize_distributed()
  dataset.prepare_dataset(config, FLAGS.out, examples_per_shard=FLAGS.examples_per_shard,
                          min_image_size=FLAGS.min_image_size, max_shards=FLAGS.max_shards,
                          max_image_pixels=FLAGS.max_image_pixels)


if __name__ == "__main__":
  app.run(main, flags_parser=lambda argv: command_line.parse_flags(argv, required=("config", "out")))
