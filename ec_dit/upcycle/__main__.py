"""`python -m ec_dit.upcycle RUN --out RUN2 --experts E --routing ec|tc ...`: upcycles a dense run (ec_dit.upcycle)."""

from __future__ import annotations

import argparse
import sys

from ec_dit import errors, upcycle
from ec_dit.upcycle import run as run_lib


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m ec_dit.upcycle", description=__doc__.split(":")[0])
  parser.add_argument("run", help="a dense run directory (config.json and checkpoints/)")
  parser.add_argument("--out", required=True, help="the new run directory")
  upcycle.add_arguments(parser, experts_flag="--experts")
  args = parser.parse_args(argv)
  if args.experts < 1:
    parser.error("--experts: must be a positive number of experts")
  opts = upcycle.options(args, "experts")
  return errors.run_cli(_upcycle, args.run, args.out, **opts)  # expected failures: one line, exit 2


def _upcycle(run: str, out: str, **opts) -> int:
  run_lib.upcycle_run(run, out, **opts)
  print(f"wrote {out} (config.json and one checkpoint)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
