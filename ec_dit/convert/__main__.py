"""Command line of the checkpoint importers.

    python -m ec_dit.convert dit_moe --checkpoint dit_moe_s_8E2A.pt \\
        --config configs/dit_moe.py:S-8E2A --out runs/dit_moe_s_8E2A [--weights ema|model|auto]
    python -m ec_dit.convert pixart --checkpoint PixArt-XL-2-512x512/transformer --out RUN
    python -m ec_dit.convert dit --checkpoint DiT-XL-2-256x256.pt --out RUN      # or a diffusers folder
    ... --upcycle_experts 8 --routing ec [--moe_every 2 --router_init normal]   # pixart, dit: sparse upcycling

`--config` is a config file with an optional variant, as `ec_dit.main`'s
`--config=file.py:VARIANT`. The output is a run directory that
`ec_dit.inference.class_to_image.ClassToImagePipeline.from_run` loads. Expected failures (a bad or
unsafe checkpoint, a mismatch with the config, a full disk) are one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from ec_dit import errors, tasks, upcycle
from ec_dit.convert import dit, dit_moe, pixart
from ec_dit.upcycle import run as upcycle_run


def load_config_file(spec: str):
  """`path.py[:VARIANT]` -> the config of `get_config(VARIANT)` (as ml_collections' config flags)."""
  path, _, variant = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--config: {path} not found")
  module_spec = importlib.util.spec_from_file_location("ec_dit_convert_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant or None)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m ec_dit.convert", description=__doc__.splitlines()[0])
  parser.add_argument("format", choices=["dit_moe", "pixart", "dit"], help="the checkpoint's library")
  parser.add_argument("--checkpoint", required=True, help="a .pt / .safetensors file, or a diffusers folder")
  parser.add_argument("--config", default=None, help="dit_moe: config file[:VARIANT], e.g. configs/dit_moe.py:S-8E2A")
  parser.add_argument("--out", required=True, help="the run directory to write")
  parser.add_argument("--weights", default="auto", choices=["auto", "ema", "model"],
                      help="which weights of a training checkpoint {'model', 'ema'} (auto: ema if present)")
  parser.add_argument("--num_heads", type=int, default=0, help="dit: heads, for a width DiT never released")
  upcycle.add_arguments(parser, experts_flag="--upcycle_experts")
  args = parser.parse_args(argv)
  return errors.run_cli(_convert, parser, args)  # expected failures: one line, exit 2


def _convert(parser, args) -> int:
  if args.format == "dit_moe":
    params, config = _dit_moe(parser, args)
  elif args.format == "pixart":
    params, config = pixart.convert(args.checkpoint)
  else:
    params, config = dit.convert(args.checkpoint, num_heads=args.num_heads or None, weights=args.weights)
  if args.upcycle_experts:
    opts = upcycle.options(args, "upcycle_experts")
    upcycle_run.write_upcycled(config, params, args.out, seed=opts.pop("seed"),
                               source=os.path.abspath(args.checkpoint), **opts)
  else:
    dit_moe.write_run(config, params, args.out)
  print(f"wrote {args.out} (config.json and checkpoints/0)")
  return 0


def _dit_moe(parser, args):
  """(params, config) of a DiT-MoE checkpoint in the variant `--config` names (its checkpoints do not say it)."""
  if not args.config:
    parser.error("--config: required for dit_moe (the checkpoint does not say its variant)")
  if args.upcycle_experts:
    parser.error("--upcycle_experts: DiT-MoE checkpoints are MoEs already")
  config = load_config_file(args.config)
  tasks.validate(config)
  task = tasks.task_for(config)
  if task.conditioning != tasks.CLASS_LABEL:
    parser.error(f"--config: config.model.arch must be 'dit_moe' to import a DiT-MoE checkpoint, got {task.arch!r}")
  return dit_moe.convert_state_dict(dit_moe.load_state_dict(args.checkpoint, args.weights), config), config


if __name__ == "__main__":
  sys.exit(main())
