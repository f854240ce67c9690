"""Shared test helpers: loading config files the way the CLI does, and the tests' own small configs.

The unit tests build their models from `tests/micro_config.py` (`base_test_config`),
not from `configs/ec_dit_tiny.py`: retuning the default run cannot change what a
unit test sees.
"""

import json
import os
import pathlib
import re
import shutil
import socket

import jax
import numpy as np

from ec_dit import configs
from micro_config import get_config as base_test_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def free_port() -> int:
  """A free localhost port for a test's coordinator (multi-process runs)."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def perturbed(params, scale: float = 0.05, seed: int = 1):
  """`params` (a pytree of arrays) plus Gaussian noise of std `scale`, as host arrays: lifts the zero-initialised
  adaLN and output layers so that every path of a fresh model carries signal."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: np.asarray(p) + scale * rng.standard_normal(np.shape(p)).astype(np.asarray(p).dtype),
                      params)


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a test's subprocess with `devices` host devices and the suite's other flags (conftest.py)."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
  return f"--xla_force_host_platform_device_count={devices} {flags}".strip()


def load_config(name: str, variant: str | None = None, path=None):
  """configs/<name>.py (or `path`) as `--config=file.py:variant` loads it (`ec_dit.configs.load`, unvalidated)."""
  path = path or REPO / "configs" / f"{name}.py"
  return configs.load(f"{path}:{variant}" if variant else str(path), validate=False)


def micro_config(variant: str | None = None, **ffn):
  """A very small model config (16x16x3, 4 layers, width 32) for fast model tests."""
  config = base_test_config(variant)
  m = config.model
  m.input_size, m.patch_size, m.hidden_size, m.depth, m.num_heads = 16, 2, 32, 4, 4
  m.context_dim, m.context_len = 16, 6
  m.ffn.num_experts = 4
  for key, value in ffn.items():
    m.ffn[key] = value
  return config


def train_config(variant: str | None = None, **overrides):
  """The test base config shrunk so a few training steps take seconds."""
  config = base_test_config(variant)
  m = config.model
  m.input_size, m.patch_size, m.hidden_size, m.depth, m.num_heads = 16, 4, 32, 2, 2
  m.context_dim, m.context_len = 32, 12
  m.ffn.num_experts = 4
  config.text.depth, config.text.num_heads, config.text.vocab_size = 1, 2, 512
  config.input.image_size = 16
  config.input.read_threads = 0
  config.batch_size = 4
  config.num_train_steps = 6
  config.warmup_steps = 2
  config.learning_rate = 1e-3
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2
  config.eval_every_steps = 0
  config.sample.num_steps = 2
  config.sample.prompts = ("a photo of a red circle",)
  config.geneval.per_task = 1
  config.geneval.images_per_prompt = 1
  config.geneval.batch_size = 8
  config.heldout.num_examples = 8  # logged as by default, on a set small enough for seconds-long tests
  set_fields(config, overrides)
  return config


def set_fields(config, fields: dict):
  """Sets `config` fields named with double underscores for dots (`input__source="..."`)."""
  for dotted, value in fields.items():
    node = config
    *parents, leaf = dotted.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = value


def read_losses(workdir) -> dict[int, float]:
  """step -> loss from metrics.jsonl (the last line for a step wins: a resumed run rewrites it)."""
  out = {}
  with open(pathlib.Path(workdir) / "metrics.jsonl") as f:
    for line in f:
      row = json.loads(line)
      out[row["step"]] = row["loss"]
  return out


def assert_resumes_bitwise(train, config, run, *, steps: int = 20, kept: int = 10) -> None:
  """`train(config, run)` for `steps` steps (checkpoints every `kept`), then again after deleting the last
  checkpoint, as if stopped after step `kept`: the resumed steps log the same losses bit for bit."""
  train(config, str(run))
  expected = read_losses(run)
  assert sorted(expected) == list(range(1, steps + 1)) and all(np.isfinite(list(expected.values())))
  shutil.rmtree(pathlib.Path(run) / "checkpoints" / str(steps))
  train(config, str(run))
  got = read_losses(run)
  for step in range(kept + 1, steps + 1):
    assert got[step] == expected[step], step  # the same data, noise and latent draws after resuming
