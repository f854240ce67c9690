"""Command line of the checkpoint importers.

    python -m ec_dit.convert dit_moe --checkpoint dit_moe_s_8E2A.pt \\
        --config configs/dit_moe.py:S-8E2A --out runs/dit_moe_s_8E2A [--weights ema|model|auto]

`--config` is a config file with an optional variant, as `ec_dit.main`'s
`--config=file.py:VARIANT`. The output is a run directory that
`ec_dit.inference_class.ClassToImagePipeline.from_run` loads. Expected failures (a bad or
unsafe checkpoint, a mismatch with the config, a full disk) are one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from ec_dit import errors, schema
from ec_dit.convert import dit_moe


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
  parser.add_argument("format", choices=["dit_moe"], help="the checkpoint's library")
  parser.add_argument("--checkpoint", required=True, help="a torch.save .pt file or a .safetensors file")
  parser.add_argument("--config", required=True, help="config file[:VARIANT], e.g. configs/dit_moe.py:S-8E2A")
  parser.add_argument("--out", required=True, help="the run directory to write")
  parser.add_argument("--weights", default="auto", choices=["auto", "ema", "model"],
                      help="which weights of a training checkpoint {'model', 'ema'} (auto: ema if present)")
  args = parser.parse_args(argv)
  try:
    config = load_config_file(args.config)
    schema.validate(config)
    if config.model.arch != "dit_moe":
      parser.error(f"--config: config.model.arch must be 'dit_moe' to import a DiT-MoE checkpoint, "
                   f"got {config.model.arch!r}")
    params = dit_moe.convert_state_dict(dit_moe.load_state_dict(args.checkpoint, args.weights), config)
    dit_moe.write_run(config, params, args.out)
  except (errors.EcDitError, ValueError, FileNotFoundError, FileExistsError) as e:  # expected: one line, exit 2
    return errors.report(e)
  except OSError as e:
    if errors.is_disk_full(e):
      return errors.report(e)
    raise
  print(f"wrote {args.out} (config.json and checkpoints/0)")
  return 0

if __name__ == "__main__":
  sys.exit(main())
