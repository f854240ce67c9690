"""Validation of a whole config against the schema, with errors that name the field.

`validate(config)` runs before anything is built or compiled and raises a
ValueError naming the field and what is allowed
(`config.model.ffn.kind: must be one of (...), got 'switch'`). It checks the
config alone; whether the files a source names exist is checked by
`ec_dit.data.sources.check_source` (the data layer reads the filesystem).
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import Any, Sequence

import ml_collections

from ec_dit.schema.checks import fail, is_int, is_number
from ec_dit.schema.class_cond import validate_class_cond
from ec_dit.schema.defaults import (ACTIVATIONS, CAPTION_TASKS, DISPATCHES, DROPLESS_IMPLS, DTYPES, FFN_KINDS,
                                    GENEVAL_DOMAINS, MESH_AXES, MIN_IMAGE_SIZE, OPTIMIZERS, PREDICTIONS, PREPARE_README,
                                    REMAT_POLICIES, SAMPLERS, SOURCE_FORMS, TEXT_ENCODERS, TOKENIZERS, base_config, input_defaults)
from ec_dit.schema.heldout import validate_heldout
from ec_dit.schema.pixart import check_sampler, validate_pixart_options


def _check_keys(config, schema, prefix=""):
  """Unknown keys, then missing ones, section by section: both name the key."""
  for key in config.keys():
    if key not in schema:
      raise ValueError(f"config.{prefix}{key}: unknown key; allowed keys here are {sorted(schema.keys())}")
  for key in schema.keys():
    name = f"{prefix}{key}"
    if key not in config:
      raise ValueError(f"config.{name}: missing; start configs from ec_dit.schema.base_config()")
    if isinstance(schema[key], ml_collections.ConfigDict):
      if not isinstance(config[key], (ml_collections.ConfigDict, dict)):
        fail(name, "a section (dict)", config[key])
      _check_keys(config[key], schema[key], name + ".")


def validate_model(m, prefix: str = "model") -> None:
  """Checks `config.model`; raises ValueError naming the first bad field."""
  f = m.ffn
  for name in ("input_size", "in_channels", "patch_size", "hidden_size", "depth", "num_heads", "context_dim",
               "context_len"):
    if not isinstance(m[name], int) or m[name] < 1:
      fail(f"{prefix}.{name}", "a positive integer", m[name])
  if m.input_size % m.patch_size:
    fail(f"{prefix}.input_size", f"divisible by patch_size={m.patch_size}", m.input_size)
  if m.hidden_size % m.num_heads:
    fail(f"{prefix}.hidden_size", f"divisible by num_heads={m.num_heads}", m.hidden_size)
  if m.hidden_size % 4:
    fail(f"{prefix}.hidden_size", "divisible by 4 (2D sin-cos positions)", m.hidden_size)
  if m.mlp_ratio <= 0:
    fail(f"{prefix}.mlp_ratio", "> 0", m.mlp_ratio)
  if m.dtype not in DTYPES:
    fail(f"{prefix}.dtype", f"one of {DTYPES}", m.dtype)
  if not isinstance(m.long_skips, bool):
    fail(f"{prefix}.long_skips", "True or False", m.long_skips)
  if m.prediction not in PREDICTIONS:
    fail(f"{prefix}.prediction", f"one of {PREDICTIONS}", m.prediction)
  validate_pixart_options(m, prefix)
  if m.remat_policy not in REMAT_POLICIES:
    fail(f"{prefix}.remat_policy", f"one of {REMAT_POLICIES}", m.remat_policy)
  p = f"{prefix}.ffn"
  if f.kind not in FFN_KINDS:
    fail(f"{p}.kind", f"one of {FFN_KINDS}", f.kind)
  if f.activation not in ACTIVATIONS:
    fail(f"{p}.activation", f"one of {ACTIVATIONS}", f.activation)
  if f.dispatch not in DISPATCHES:
    fail(f"{p}.dispatch", f"one of {DISPATCHES}", f.dispatch)
  if not isinstance(f.num_experts, int) or f.num_experts < 1:
    fail(f"{p}.num_experts", "a positive integer", f.num_experts)
  if not isinstance(f.moe_every, int) or f.moe_every < 1:
    fail(f"{p}.moe_every", "a positive integer", f.moe_every)
  if not isinstance(f.dense_first_n, int) or not 0 <= f.dense_first_n <= m.depth:
    fail(f"{p}.dense_first_n", f"an integer in [0, depth={m.depth}]", f.dense_first_n)
  for name in ("train_capacity_factor", "eval_capacity_factor"):
    if f[name] <= 0:
      fail(f"{p}.{name}", "> 0", f[name])
  if f.token_capacity_factor < 0:
    fail(f"{p}.token_capacity_factor", ">= 0 (0 = dropless)", f.token_capacity_factor)
  if f.dropless_impl not in DROPLESS_IMPLS:
    fail(f"{p}.dropless_impl", f"one of {DROPLESS_IMPLS}", f.dropless_impl)
  if f.kind == "token_choice" and not 1 <= f.top_k <= f.num_experts:
    fail(f"{p}.top_k", f"in [1, num_experts={f.num_experts}]", f.top_k)
  if f.num_shared_experts < 0:
    fail(f"{p}.num_shared_experts", ">= 0", f.num_shared_experts)
  if f.dense_mlp_ratio <= 0:
    fail(f"{p}.dense_mlp_ratio", "> 0", f.dense_mlp_ratio)
  for name in ("router_z_loss_coef", "balance_loss_coef"):
    if f[name] < 0:
      fail(f"{p}.{name}", ">= 0", f[name])
  g, tokens = f.routing_group_size, (m.input_size // m.patch_size) ** 2
  if not isinstance(g, int) or g < -1 or (g > 0 and tokens % g and g % tokens):
    fail(f"{p}.routing_group_size", f"0 (per image), -1 (whole batch), a divisor or multiple of {tokens}", g)


def validate(config) -> None:
  """Validates a whole config against the schema; raises ValueError naming the field.

  The checks that depend on the model family (`config.model.arch`) are the task's:
  `ec_dit.tasks.validate(config)` runs this, then them.
  """
  _check_keys(config, base_config())
  validate_model(config.model)
  validate_class_cond(config)
  validate_training(config)
  validate_heldout(config)
  validate_input(config.input)
  validate_mesh(config.mesh)


def _check_int(config, name: str, low: int, prefix: str = "") -> None:
  if not is_int(config[name]) or config[name] < low:
    fail(prefix + name, f"an integer >= {low}", config[name])


def _check_range(config, name: str, low: float, high: float, prefix: str = "", *,
                 low_open: bool = False, high_open: bool = False) -> None:
  """A number in the interval [low, high] (either end open on request)."""
  v = config[name]
  ok = is_number(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
  if not ok:
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    fail(prefix + name, f"a number in {interval}", v)


def validate_training(config) -> None:
  """Checks the training, text, diffusion, sampling and GenEval fields; raises ValueError
  naming the first bad field (before anything is built, so a typo in a sampler name
  does not surface only after a whole training run)."""
  inf = float("inf")
  _check_int(config, "num_train_steps", 0)
  _check_int(config, "seed", 0)
  for name in ("batch_size", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    _check_int(config, name, 1)
  _check_int(config, "warmup_steps", 0)
  _check_int(config, "eval_every_steps", 0)  # 0: no sample grids during training
  _check_range(config, "learning_rate", 0.0, inf, low_open=True)
  _check_range(config, "weight_decay", 0.0, inf)
  _check_range(config, "adam_b1", 0.0, 1.0, high_open=True)
  _check_range(config, "adam_b2", 0.0, 1.0, high_open=True)
  _check_range(config, "grad_clip_norm", 0.0, inf, low_open=True)
  if config.optimizer not in OPTIMIZERS:
    fail("optimizer", f"one of {OPTIMIZERS}", config.optimizer)
  _check_range(config.muon, "beta", 0.0, 1.0, "muon.", high_open=True)
  _check_int(config.muon, "ns_steps", 1, "muon.")
  if not isinstance(config.muon.experts, bool):
    fail("muon.experts", "True or False", config.muon.experts)
  _check_range(config, "ema_decay", 0.0, 1.0)

  if config.text.encoder not in TEXT_ENCODERS:
    fail("text.encoder", f"one of {TEXT_ENCODERS}", config.text.encoder)
  if config.text.encoder == "t5" and parse_source(config.input.source)[0] != "latents":
    fail("input.source", "'latents:DIR' with text.encoder='t5' (the model reads prepared T5 features; "
         "see the " + PREPARE_README + ")", config.input.source)
  e = config.encoders
  for name in ("t5_path", "vae_path"):
    if not isinstance(e[name], str):
      fail(f"encoders.{name}", "a folder path ('' = not set)", e[name])
  if e.dtype not in DTYPES:
    fail("encoders.dtype", f"one of {DTYPES}", e.dtype)
  _check_int(e, "batch_size", 1, "encoders.")
  if config.text.tokenizer not in TOKENIZERS:
    fail("text.tokenizer", f"one of {TOKENIZERS}", config.text.tokenizer)
  _check_int(config.text, "vocab_size", 2, "text.")
  _check_int(config.text, "depth", 0, "text.")
  _check_int(config.text, "num_heads", 1, "text.")
  if config.model.context_dim % config.text.num_heads:
    fail("text.num_heads", f"a divisor of model.context_dim={config.model.context_dim}", config.text.num_heads)

  d = config.diffusion
  _check_range(d, "t_mean", -inf, inf, "diffusion.", low_open=True, high_open=True)
  _check_range(d, "t_std", 0.0, inf, "diffusion.", low_open=True)
  _check_range(d, "uncond_prob", 0.0, 1.0, "diffusion.", high_open=True)
  _check_range(d, "loss_t_min", 0.0, 1.0, "diffusion.")

  s = config.sample
  check_sampler(s, config.model.prediction, SAMPLERS)
  _check_int(s, "num_steps", 1, "sample.")
  _check_int(s, "seed", 0, "sample.")
  _check_range(s, "guidance_scale", 0.0, inf, "sample.")
  _check_range(s, "guidance_parallel", 0.0, 1.0, "sample.")
  if isinstance(s.prompts, str) or not all(isinstance(p, str) for p in s.prompts):
    fail("sample.prompts", "a list of strings", s.prompts)

  g = config.geneval
  if g.domain not in GENEVAL_DOMAINS:
    fail("geneval.domain", f"one of {GENEVAL_DOMAINS}", g.domain)
  for name in ("per_task", "images_per_prompt", "batch_size"):
    _check_int(g, name, 1, "geneval.")
  _check_int(g, "prompt_seed", 0, "geneval.")


# -- config.input ----------------------------------------------------------------
def parse_source(source: str) -> tuple[str, Any]:
  """Splits `config.input.source` into `(kind, detail)`.

  Returns `("shapes_world", None)`, `("tfds", (name, split))`, `("folder", Path)`,
  `("jsonl", Path)` or `("latents", Path)` (`("latents", None)` for "latents:" with the folder
  not set yet); raises ValueError naming `config.input.source` for anything else.
  """
  allowed = "one of " + ", ".join(SOURCE_FORMS)
  if not isinstance(source, str):
    fail("input.source", allowed, source)
  if source == "shapes_world":
    return "shapes_world", None
  kind, sep, rest = source.partition(":")
  if kind == "latents" and sep and not rest.strip():
    return "latents", None  # a paper config's placeholder: ec_dit.data.sources.check_source names it
  if not sep or kind not in ("tfds", "folder", "jsonl", "latents") or not rest.strip():
    fail("input.source", allowed, source)
  if kind == "tfds":
    name, _, split = rest.partition(":")
    m = re.match(r"^(\d+\.\d+\.\d+)(?::(.*))?$", split)
    if m:  # NAME:VERSION[:SPLIT]
      name, split = f"{name}:{m.group(1)}", m.group(2) or ""
    if not re.match(r"^[A-Za-z0-9_]+(/[A-Za-z0-9_.\-]+)?(:\d+\.\d+\.\d+)?$", name):
      fail("input.source", f"{allowed} with a TFDS dataset name like 'mnist' or 'shapes_world/size32'", source)
    return "tfds", (name, split or "train")
  return kind, pathlib.Path(os.path.expanduser(rest))


def with_input_defaults(input_config) -> ml_collections.ConfigDict:
  """`config.input` (a ConfigDict or dict) with missing keys filled from `input_defaults()`;
  unknown keys raise a ValueError naming them."""
  schema = input_defaults()
  for key in input_config.keys():
    if key not in schema:
      raise ValueError(f"config.input.{key}: unknown key; allowed keys here are {sorted(schema.keys())}")
  return ml_collections.ConfigDict(dict(schema.to_dict(), **dict(input_config.items())))


def validate_input(input_config) -> ml_collections.ConfigDict:
  """Checks `config.input` as a config (forms, ranges, keys); returns it with defaults filled.

  Whether a folder, file or TFDS dataset exists is `ec_dit.data.sources.check_source`'s job.
  """
  c = with_input_defaults(input_config)
  p = "input."
  _check_int(c, "image_size", MIN_IMAGE_SIZE, p)
  if not is_int(c.num_examples) or c.num_examples < 1:
    fail("input.num_examples", "a positive integer", c.num_examples)
  if not is_int(c.data_seed) or not 0 <= c.data_seed < 2**32:
    fail("input.data_seed", "an integer in [0, 2**32)", c.data_seed)
  tasks = c.shapes_world_tasks
  if (isinstance(tasks, str) or not isinstance(tasks, Sequence) or not tasks
      or any(t not in CAPTION_TASKS for t in tasks)):
    fail("input.shapes_world_tasks", f"a non-empty sequence of {CAPTION_TASKS}", tasks)
  for name in ("shuffle", "skip_bad_examples"):
    if not isinstance(c[name], bool):
      fail(f"input.{name}", "True or False", c[name])
  for name in ("worker_count", "read_threads"):
    _check_int(c, name, 0, p)
  if not is_int(c.prefetch_buffer_size) or c.prefetch_buffer_size < 1:
    fail("input.prefetch_buffer_size", "a positive integer", c.prefetch_buffer_size)
  for name in ("image_key", "caption_key"):
    if not isinstance(c[name], str) or not c[name]:
      fail(f"input.{name}", "a non-empty string", c[name])
  if not isinstance(c.tfds_data_dir, str):
    fail("input.tfds_data_dir", "a string ('' = TFDS default)", c.tfds_data_dir)
  parse_source(c.source)
  return c


# -- config.mesh -----------------------------------------------------------------
def as_axes(target) -> tuple[str, ...]:
  """A rule's target (None, one mesh axis or a tuple of them) as a tuple of mesh axes."""
  if target is None:
    return ()
  if isinstance(target, str):
    return (target,)
  return tuple(target)


def validate_mesh(mesh_config, prefix: str = "mesh") -> None:
  """Checks `config.mesh` (without knowing the device count); raises ValueError naming the field."""
  sizes = [mesh_config[a] for a in MESH_AXES]
  for axis, size in zip(MESH_AXES, sizes):
    if isinstance(size, bool) or not isinstance(size, int) or not (size == -1 or size >= 1):
      fail(f"{prefix}.{axis}", "a positive integer or -1 (the rest of the devices)", size)
  if sizes.count(-1) > 1:
    fail(prefix, "at most one axis of size -1", dict(zip(MESH_AXES, sizes)))
  rules = mesh_config.rules
  if not isinstance(rules, (tuple, list)):
    fail(f"{prefix}.rules", "a tuple of (logical axis, mesh axes) pairs", rules)
  seen = set()
  for rule in rules:
    if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
      fail(f"{prefix}.rules", "pairs (logical axis name, None | mesh axis | tuple of mesh axes)", rule)
    if rule[0] in seen:
      fail(f"{prefix}.rules", f"one rule per logical axis; {rule[0]!r} appears twice", rule)
    seen.add(rule[0])
    target = rule[1]
    if not (target is None or isinstance(target, str) or
            (isinstance(target, (tuple, list)) and all(isinstance(t, str) for t in target))):
      fail(f"{prefix}.rules", "pairs (logical axis name, None | mesh axis | tuple of mesh axes)", rule)
    axes = as_axes(target)
    for a in axes:
      if a not in MESH_AXES:
        fail(f"{prefix}.rules", f"mesh axes among {MESH_AXES}", rule)
    if len(set(axes)) != len(axes):
      fail(f"{prefix}.rules", "no mesh axis twice in one rule", rule)


# -- paths a job needs -------------------------------------------------------------
def missing_paths(config, mode: str) -> list[str]:
  """The unset fields a latent run (`text.encoder = "t5"`) needs for `mode`, as 'config.FIELD (what)'.

  Training reads prepared data (`input.source = "latents:DIR"`); sampling, the
  sample grids during training and evaluation also need the T5 encoder and the VAE.
  """
  if config.text.encoder != "t5":
    return []
  missing = []
  kind, folder = parse_source(config.input.source)
  trains = mode in ("train", "train_and_evaluate")
  samples = mode in ("train_and_evaluate", "evaluate", "sample") or (trains and config.eval_every_steps > 0)
  if trains and kind == "latents" and folder is None:
    missing.append("config.input.source ('latents:DIR', a folder written by `python -m ec_dit.prepare`)")
  if samples and not config.encoders.t5_path:
    missing.append("config.encoders.t5_path (the T5 encoder folder the data was prepared with)")
  if samples and not config.encoders.vae_path:
    missing.append("config.encoders.vae_path (the VAE folder the data was prepared with)")
  return missing


def check_paths(config, mode: str) -> None:
  """Raises one ValueError listing every field `missing_paths` finds, and where the README explains them."""
  missing = missing_paths(config, mode)
  if missing:
    raise ValueError(f"--mode={mode} of a latent run needs paths that are not set:\n  " + "\n  ".join(missing)
                     + f"\nSee the {PREPARE_README}; or --mode=compile / --mode=summary, which need none.")
