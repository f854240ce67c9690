"""Runs a tiny training in its own process (for kill / SIGTERM tests).

Usage: train_runner.py WORKDIR [JSON overrides] [train|train_and_evaluate]
"""

import json
import sys

from ec_dit import evaluators
from helpers import train_config

if __name__ == "__main__":
  overrides = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
  mode = sys.argv[3] if len(sys.argv) > 3 else "train"
  getattr(evaluators, mode)(train_config(**overrides), sys.argv[1])  # as the CLI runs it
