"""Configs from Python: a config file as the CLI reads it, and the config a run was trained with.

    from ec_dit import configs
    config = configs.load("configs/ec_dit_tiny.py:tc", overrides=["num_train_steps=300", "model.depth=4"])
    run_config = configs.from_run("runs/tiny")     # workdir/config.json, new schema keys at their defaults

`load("file.py:VARIANT")` is `--config=file.py:VARIANT` of `python -m ec_dit.main`, and each override
`"a.b=value"` is `--config.a.b=value` (values are Python literals; anything else is a string).

This module is also a config file: `--config=ec_dit/configs.py:WORKDIR` is the run's own config, which
`python -m ec_dit.main --mode=sample|routing_maps|evaluate` uses when no `--config` is given.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
from typing import Iterable

import ml_collections

from ec_dit import schema, tasks

RUN_CONFIG_NAME = "config.json"


def _load_module(path: str):
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path} not found (expected a file such as configs/ec_dit_tiny.py)")
  spec = importlib.util.spec_from_file_location(f"ec_dit_config_{abs(hash(os.path.abspath(path)))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {path} defines no get_config(variant=None)")
  return module


def _parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str] | dict) -> ml_collections.ConfigDict:
  """Sets `"a.b=value"` strings (or a {"a.b": value} dict) on `config`; an unknown key is a ValueError naming it."""
  items = overrides.items() if isinstance(overrides, dict) else [_split(o) for o in overrides]
  known = list(schema.flatten(config.to_dict()))
  for key, value in items:
    *path, leaf = key.split(".")
    parent = config
    for part in path:
      parent = parent.get(part) if isinstance(parent, ml_collections.ConfigDict) else None
    if not isinstance(parent, ml_collections.ConfigDict) or leaf not in parent:
      close = difflib.get_close_matches(key, known, n=3, cutoff=0.0)
      raise ValueError(f"override {key!r}: unknown config key; closest known: {', '.join(close)}")
    if isinstance(parent[leaf], tuple) and isinstance(value, list):
      value = tuple(value)
    parent[leaf] = value
  return config


def _split(override: str) -> tuple[str, object]:
  if "=" not in override:
    raise ValueError(f"override {override!r}: expected KEY=VALUE, e.g. 'sample.num_steps=8'")
  key, text = override.split("=", 1)
  return key.strip().removeprefix("config."), _parse_value(text)


def load(spec: str, overrides: Iterable[str] | dict = (), *, validate: bool = True) -> ml_collections.ConfigDict:
  """The config of `"path/to/file.py[:VARIANT]"` with `overrides` applied, validated (ValueError naming the field)."""
  path, _, variant = spec.partition(":")
  config = _load_module(path).get_config(variant or None)
  apply_overrides(config, overrides)
  if validate:
    tasks.validate(config)
  return config


def _fill_defaults(saved: dict, defaults: dict) -> dict:
  """Adds the keys of `defaults` missing from `saved`, recursively; saved values win."""
  for key, value in defaults.items():
    if key not in saved:
      saved[key] = value
    elif isinstance(value, dict) and isinstance(saved[key], dict):
      _fill_defaults(saved[key], value)
  return saved


def from_run(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with (`workdir/config.json`).

  Keys added to the schema after the run was saved take their defaults, so runs
  from older versions still load (a new default never changes an old model's
  behaviour).
  """
  path = os.path.join(workdir, RUN_CONFIG_NAME)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a training run directory?")
  with open(path) as f:
    saved = json.load(f)
  return ml_collections.ConfigDict(_fill_defaults(saved, schema.base_config().to_dict()))


# The fields a finished run's weights were trained for: a command that only reads the run (sample, routing maps,
# evaluate) may not change them. Sampling, GenEval, encoder folders, the mesh and training-only fields may differ.
MODEL_FIELDS = ("model", "text", "input.image_size", "class_diffusion.objective", "class_diffusion.num_timesteps",
                "class_diffusion.beta_start", "class_diffusion.beta_end")
MODEL_FIELDS_EXEMPT = ("model.ffn.dropless_impl",)  # how the same grouped matmuls are computed


def model_differences(run_config, config) -> list[tuple[str, object, object]]:
  """(field, run's value, given value) for each `MODEL_FIELDS` field where `config` differs from the run's."""
  under = lambda f, ps: any(f == p or f.startswith(p + ".") for p in ps)  # noqa: E731
  diffs = schema.config_differences(json.loads(json.dumps(run_config.to_dict(), default=list)),
                                    json.loads(json.dumps(config.to_dict(), default=list)))
  return [d for d in diffs if under(d[0], MODEL_FIELDS) and not under(d[0], MODEL_FIELDS_EXEMPT)]


def check_applies_to_run(workdir: str, config, mode: str) -> None:
  """Refuses (ValueError, one line) a config whose model differs from the finished run's in `workdir`."""
  diffs = model_differences(from_run(workdir), config)
  if diffs:
    shown = ", ".join(f"config.{f}: {a!r} -> {b!r}" for f, a, b in diffs[:4]) + (" ..." if len(diffs) > 4 else "")
    raise ValueError(f"--mode={mode} reads the finished run in {workdir}, whose model cannot change: {shown}. "
                     f"Drop --config (the run's own {os.path.join(workdir, RUN_CONFIG_NAME)} is the default) and "
                     f"override only sample.*, geneval.* or encoders.*")


def get_config(workdir: str | None = None) -> ml_collections.ConfigDict:
  """Config-file protocol (`--config=ec_dit/configs.py:WORKDIR`): the run's own config."""
  if not workdir:
    raise ValueError("ec_dit/configs.py as a config file needs the run's workdir: --config=ec_dit/configs.py:WORKDIR")
  return from_run(workdir)


# config.model.ffn fields that only one FFN kind reads.
_FFN_ONLY = {
    "expert_choice": ("train_capacity_factor", "eval_capacity_factor"),
    "token_choice": ("top_k", "num_shared_experts", "token_capacity_factor", "dropless_impl", "renormalize_gates",
                     "balance_loss_coef"),
    "dense": ("dense_mlp_ratio",),
}
_MOE_FIELDS = ("num_experts", "decoupled_routing", "dispatch", "routing_group_size", "router_z_loss_coef")


def applicable_model(config) -> ml_collections.ConfigDict:
  """A copy of `config.model` with only the fields its architecture and FFN kind read (for printing):
  no `class_cond` for a text-to-image model, no token-choice fields for expert choice, and so on."""
  m = ml_collections.ConfigDict(config.model.to_dict())
  task = tasks.task_for(config)
  for section in {s for t in tasks.TASKS.values() for s in t.model_sections} - set(task.model_sections):
    if section in m:
      del m[section]
  kind = m.ffn.kind
  drop = [f for k, fields in _FFN_ONLY.items() if k != kind for f in fields]
  if kind == "dense":
    drop += _MOE_FIELDS
  for name in drop:
    if name in m.ffn:
      del m.ffn[name]
  return m
