"""The config schema: every key, its default, and validation with clear errors.

Config files in `configs/` start from `base_config()` and change fields; they may
not add keys. `validate(config)` runs before anything is built or compiled and
raises a ValueError naming the field and what is allowed.
"""

from __future__ import annotations

import numbers
from typing import Any

import ml_collections

FFN_KINDS = ("dense", "expert_choice", "token_choice")
DISPATCHES = ("einsum", "gather")
ACTIVATIONS = ("gelu", "swiglu")
DTYPES = ("float32", "bfloat16")
OPTIMIZERS = ("adamw", "muon")


def model_defaults() -> ml_collections.ConfigDict:
  """Defaults of `config.model`: a DiT-XL/2-sized EC-DiT on a 32x32x4 latent."""
  return ml_collections.ConfigDict(dict(
      input_size=32,          # latent (or pixel) height = width
      in_channels=4,          # latent channels (3 for pixel space)
      patch_size=2,
      hidden_size=1152,
      depth=28,
      num_heads=18,
      mlp_ratio=4.0,          # dense FFN and each expert: width mlp_ratio * hidden
      context_dim=4096,       # width of the text features fed to cross-attention
      context_len=120,        # text tokens per prompt (PixArt-alpha's T5 length)
      pooled_text_conditioning=False,  # add the mean text feature to the adaLN conditioning
      long_skips=False,       # U-ViT long skip connections from the first to the last blocks (ec_dit.dit)
      prediction="velocity",  # what the network outputs: "velocity" (EC-DiT) or "x0" (JiT); see ec_dit.dit
      dtype="float32",        # compute dtype; parameters stay float32
      remat_policy="none",    # activation checkpointing per block (see ec_dit.dit.REMAT_POLICIES)
      ffn=dict(
          kind="expert_choice",
          activation="gelu",
          num_experts=32,
          moe_every=2,          # MoE in layers 2, 4, ... (1-based)
          dense_first_n=0,      # Nucleus-Image keeps the first layers dense
          decoupled_routing=False,
          dispatch="einsum",
          routing_group_size=0,  # tokens per routing group; 0 = one group per image
          router_z_loss_coef=0.0,
          # expert choice
          train_capacity_factor=2.0,
          eval_capacity_factor=2.0,
          # token choice (DiT-MoE)
          top_k=2,
          num_shared_experts=2,
          token_capacity_factor=0.0,  # 0 = dropless
          renormalize_gates=False,
          balance_loss_coef=0.01,
          # dense kind: width of the FFN at the MoE positions, as a multiple of hidden
          dense_mlp_ratio=4.0,
      ),
  ))


def paper_model(hidden_size: int, depth: int, num_heads: int, num_experts: int) -> ml_collections.ConfigDict:
  """EC-DiT's paper setting at a given size: 256x256 images as a 32x32x4 latent, patch 2
  (256 tokens), expert choice with capacity factor 2, MoE every other layer, experts
  2-layer GELU FFNs of width 4d."""
  m = model_defaults()
  m.hidden_size, m.depth, m.num_heads = hidden_size, depth, num_heads
  m.ffn.num_experts = num_experts
  return m


def base_config() -> ml_collections.ConfigDict:
  """The full schema with defaults: every key a config file may set."""
  from ec_dit import input_pipeline, sharding  # their sections live beside the code that reads them

  config = ml_collections.ConfigDict()
  config.model = model_defaults()
  config.text = ml_collections.ConfigDict(dict(
      tokenizer="words",   # "words" (hashed, any Unicode) or "bytes"
      vocab_size=4096,
      depth=2,             # trainable encoder layers; width = model.context_dim
      num_heads=4,
  ))
  config.input = input_pipeline.input_defaults()
  config.mesh = sharding.mesh_defaults()  # device mesh and logical-to-mesh rules (ec_dit.sharding)
  # Training, in the Flax examples' style: any field can be set as --config.FIELD=VALUE.
  config.seed = 0
  config.num_train_steps = 100_000
  config.batch_size = 256
  config.learning_rate = 1e-4
  config.warmup_steps = 1000
  config.weight_decay = 0.0
  config.adam_b1 = 0.9
  config.adam_b2 = 0.999
  config.grad_clip_norm = 1.0
  config.optimizer = "adamw"  # or "muon": Muon on hidden matrices, AdamW on the rest (ec_dit.muon)
  config.muon = ml_collections.ConfigDict(dict(
      beta=0.95,      # Nesterov momentum
      ns_steps=5,     # Newton-Schulz iterations
      experts=True,   # expert matrices too (else AdamW for them)
  ))
  config.ema_decay = 0.9999
  config.log_every_steps = 100
  config.checkpoint_every_steps = 5000
  config.keep_checkpoints = 3
  config.eval_every_steps = 5000     # sample grids; 0 = none
  config.diffusion = ml_collections.ConfigDict(dict(
      t_mean=0.0, t_std=1.0,   # logit-normal timesteps
      uncond_prob=0.1,         # text dropped for classifier-free guidance
      loss_t_min=0.0,          # > 0: velocity-loss weight min(1, (t/loss_t_min)^2) (diffusion.loss_weight)
  ))
  config.sample = ml_collections.ConfigDict(dict(
      sampler="euler", num_steps=32, guidance_scale=4.0, seed=0,
      # 1 = standard CFG; < 1 scales the guidance update's part along the clean-image estimate (APG)
      guidance_parallel=1.0,
      prompts=("a photo of a red circle", "a photo of a blue square", "a photo of two green triangles",
               "a photo of a yellow circle left of a purple square"),
  ))
  config.geneval = ml_collections.ConfigDict(dict(
      domain="shapes", per_task=100, images_per_prompt=4, prompt_seed=0, batch_size=64,
  ))
  return config


def _fail(field: str, allowed: str, got: Any):
  raise ValueError(f"config.{field}: must be {allowed}, got {got!r}")


def _check_keys(config, schema, prefix=""):
  for key in config.keys():
    name = f"{prefix}{key}"
    if key not in schema:
      raise ValueError(f"config.{name}: unknown key; allowed keys here are {sorted(schema.keys())}")
    if isinstance(schema[key], ml_collections.ConfigDict):
      if not isinstance(config[key], (ml_collections.ConfigDict, dict)):
        _fail(name, "a section (dict)", config[key])
      _check_keys(config[key], schema[key], name + ".")


def validate_model(m, prefix: str = "model") -> None:
  """Checks `config.model`; raises ValueError naming the first bad field."""
  f = m.ffn
  for name in ("input_size", "in_channels", "patch_size", "hidden_size", "depth", "num_heads", "context_dim",
               "context_len"):
    if not isinstance(m[name], int) or m[name] < 1:
      _fail(f"{prefix}.{name}", "a positive integer", m[name])
  if m.input_size % m.patch_size:
    _fail(f"{prefix}.input_size", f"divisible by patch_size={m.patch_size}", m.input_size)
  if m.hidden_size % m.num_heads:
    _fail(f"{prefix}.hidden_size", f"divisible by num_heads={m.num_heads}", m.hidden_size)
  if m.hidden_size % 4:
    _fail(f"{prefix}.hidden_size", "divisible by 4 (2D sin-cos positions)", m.hidden_size)
  if m.mlp_ratio <= 0:
    _fail(f"{prefix}.mlp_ratio", "> 0", m.mlp_ratio)
  if m.dtype not in DTYPES:
    _fail(f"{prefix}.dtype", f"one of {DTYPES}", m.dtype)
  from ec_dit.dit import PREDICTIONS, REMAT_POLICIES  # local import: dit imports this module
  if not isinstance(m.long_skips, bool):
    _fail(f"{prefix}.long_skips", "True or False", m.long_skips)
  if m.prediction not in PREDICTIONS:
    _fail(f"{prefix}.prediction", f"one of {PREDICTIONS}", m.prediction)
  if m.remat_policy not in REMAT_POLICIES:
    _fail(f"{prefix}.remat_policy", f"one of {tuple(REMAT_POLICIES)}", m.remat_policy)
  p = f"{prefix}.ffn"
  if f.kind not in FFN_KINDS:
    _fail(f"{p}.kind", f"one of {FFN_KINDS}", f.kind)
  if f.activation not in ACTIVATIONS:
    _fail(f"{p}.activation", f"one of {ACTIVATIONS}", f.activation)
  if f.dispatch not in DISPATCHES:
    _fail(f"{p}.dispatch", f"one of {DISPATCHES}", f.dispatch)
  if not isinstance(f.num_experts, int) or f.num_experts < 1:
    _fail(f"{p}.num_experts", "a positive integer", f.num_experts)
  if not isinstance(f.moe_every, int) or f.moe_every < 1:
    _fail(f"{p}.moe_every", "a positive integer", f.moe_every)
  if not isinstance(f.dense_first_n, int) or not 0 <= f.dense_first_n <= m.depth:
    _fail(f"{p}.dense_first_n", f"an integer in [0, depth={m.depth}]", f.dense_first_n)
  for name in ("train_capacity_factor", "eval_capacity_factor"):
    if f[name] <= 0:
      _fail(f"{p}.{name}", "> 0", f[name])
  if f.token_capacity_factor < 0:
    _fail(f"{p}.token_capacity_factor", ">= 0 (0 = dropless)", f.token_capacity_factor)
  if f.kind == "token_choice" and not 1 <= f.top_k <= f.num_experts:
    _fail(f"{p}.top_k", f"in [1, num_experts={f.num_experts}]", f.top_k)
  if f.num_shared_experts < 0:
    _fail(f"{p}.num_shared_experts", ">= 0", f.num_shared_experts)
  if f.dense_mlp_ratio <= 0:
    _fail(f"{p}.dense_mlp_ratio", "> 0", f.dense_mlp_ratio)
  for name in ("router_z_loss_coef", "balance_loss_coef"):
    if f[name] < 0:
      _fail(f"{p}.{name}", ">= 0", f[name])
  tokens = (m.input_size // m.patch_size) ** 2
  g = f.routing_group_size
  if not isinstance(g, int) or g < 0 or (g and tokens % g and g % tokens):
    _fail(f"{p}.routing_group_size", f"0 (per image) or a divisor or multiple of tokens per image ({tokens})", g)


def validate(config) -> None:
  """Validates a whole config against the schema; raises ValueError naming the field."""
  _check_keys(config, base_config())
  _check_missing(config, base_config())
  validate_model(config.model)
  validate_training(config)
  from ec_dit import input_pipeline, sharding
  input_pipeline.validate_input(config.input)
  sharding.validate_mesh(config.mesh)


def is_int(v) -> bool:
  """An integer (Python or numpy), not a bool: the check every config validator uses."""
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_int(config, name: str, low: int, prefix: str = "") -> None:
  if not is_int(config[name]) or config[name] < low:
    _fail(prefix + name, f"an integer >= {low}", config[name])


def _check_range(config, name: str, low: float, high: float, prefix: str = "", *,
                 low_open: bool = False, high_open: bool = False) -> None:
  """A number in the interval [low, high] (either end open on request)."""
  v = config[name]
  ok = _is_number(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
  if not ok:
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    _fail(prefix + name, f"a number in {interval}", v)


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
    _fail("optimizer", f"one of {OPTIMIZERS}", config.optimizer)
  _check_range(config.muon, "beta", 0.0, 1.0, "muon.", high_open=True)
  _check_int(config.muon, "ns_steps", 1, "muon.")
  if not isinstance(config.muon.experts, bool):
    _fail("muon.experts", "True or False", config.muon.experts)
  _check_range(config, "ema_decay", 0.0, 1.0)

  from ec_dit import text  # local imports, as in validate_model: avoids import cycles
  if config.text.tokenizer not in text.TOKENIZERS:
    _fail("text.tokenizer", f"one of {text.TOKENIZERS}", config.text.tokenizer)
  _check_int(config.text, "vocab_size", 2, "text.")
  _check_int(config.text, "depth", 0, "text.")
  _check_int(config.text, "num_heads", 1, "text.")
  if config.model.context_dim % config.text.num_heads:
    _fail("text.num_heads", f"a divisor of model.context_dim={config.model.context_dim}", config.text.num_heads)

  d = config.diffusion
  _check_range(d, "t_mean", -inf, inf, "diffusion.", low_open=True, high_open=True)
  _check_range(d, "t_std", 0.0, inf, "diffusion.", low_open=True)
  _check_range(d, "uncond_prob", 0.0, 1.0, "diffusion.", high_open=True)
  _check_range(d, "loss_t_min", 0.0, 1.0, "diffusion.")

  from ec_dit import diffusion
  s = config.sample
  if s.sampler not in diffusion.SAMPLERS:
    _fail("sample.sampler", f"one of {diffusion.SAMPLERS}", s.sampler)
  _check_int(s, "num_steps", 1, "sample.")
  _check_int(s, "seed", 0, "sample.")
  _check_range(s, "guidance_scale", 0.0, inf, "sample.")
  _check_range(s, "guidance_parallel", 0.0, 1.0, "sample.")
  if isinstance(s.prompts, str) or not all(isinstance(p, str) for p in s.prompts):
    _fail("sample.prompts", "a list of strings", s.prompts)

  from ec_dit.geneval import prompts as prompts_lib
  g = config.geneval
  if g.domain not in prompts_lib.DOMAINS:
    _fail("geneval.domain", f"one of {tuple(prompts_lib.DOMAINS)}", g.domain)
  for name in ("per_task", "images_per_prompt", "batch_size"):
    _check_int(g, name, 1, "geneval.")
  _check_int(g, "prompt_seed", 0, "geneval.")


def _check_missing(config, schema, prefix=""):
  for key in schema.keys():
    name = f"{prefix}{key}"
    if key not in config:
      raise ValueError(f"config.{name}: missing; start configs from ec_dit.config_lib.base_config()")
    if isinstance(schema[key], ml_collections.ConfigDict):
      _check_missing(config[key], schema[key], name + ".")


VARIANTS = {
    "ec": "expert choice (EC-DiT), the default",
    "tc": "token choice top-2, no shared experts: activated compute matched to ec",
    "dit_moe": "DiT-MoE's recipe: token choice top-2 plus 2 shared experts, balance loss 0.01",
    "dense": "dense FFN of width capacity_factor x mlp_ratio x hidden at the MoE positions: matched to ec",
}


def apply_variant(config: ml_collections.ConfigDict, variant: str | None) -> ml_collections.ConfigDict:
  """Applies a named FFN variant (the `file.py:VARIANT` part of --config) in place."""
  f = config.model.ffn
  if variant in (None, "", "ec"):
    f.kind = "expert_choice"
  elif variant == "tc":
    f.kind, f.top_k, f.num_shared_experts = "token_choice", 2, 0
  elif variant == "dit_moe":
    f.kind, f.top_k, f.num_shared_experts, f.balance_loss_coef = "token_choice", 2, 2, 0.01
  elif variant == "dense":
    f.kind = "dense"
    f.dense_mlp_ratio = f.train_capacity_factor * config.model.mlp_ratio
  else:
    raise ValueError(f"config variant must be one of {sorted(VARIANTS)}, got {variant!r}")
  return config
