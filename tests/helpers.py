"""Shared test helpers: loading config files the way the CLI does, tiny model configs."""

import importlib.util
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str, variant: str | None = None):
  """Loads configs/<name>.py and calls get_config(variant), as `--config=file.py:variant` does."""
  path = REPO / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def micro_config(variant: str | None = None, **ffn):
  """A very small model config (16x16x3, 4 layers, width 32) for fast model tests."""
  config = load_config("ec_dit_tiny", variant)
  m = config.model
  m.input_size, m.patch_size, m.hidden_size, m.depth, m.num_heads = 16, 2, 32, 4, 4
  m.context_dim, m.context_len = 16, 6
  m.ffn.num_experts = 4
  for key, value in ffn.items():
    m.ffn[key] = value
  return config
