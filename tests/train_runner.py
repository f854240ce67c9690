"""Runs a tiny training in its own process (for kill / SIGTERM tests): train_runner.py WORKDIR [JSON overrides]."""

import json
import sys

from ec_dit import train
from helpers import train_config

if __name__ == "__main__":
  overrides = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
  train.train(train_config(**overrides), sys.argv[1])
