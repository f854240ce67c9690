"""The config schema's defaults and the tuples of allowed values.

This module is the bottom of the package: it imports nothing else from
`ec_dit`. Every other module that checks a config field, or needs the list of
what a field may hold (FFN kinds, samplers, tokenizers, GenEval tasks, mesh
axes), reads it from here, so a value is named in one place.

Config files in `configs/` start from `base_config()` and change fields; they
may not add keys (see `ec_dit.schema.validation`).
"""

from __future__ import annotations

import ml_collections

from ec_dit.schema.class_cond import class_cond_model_defaults, class_diffusion_defaults
from ec_dit.schema.heldout import heldout_defaults

# -- Allowed values ------------------------------------------------------------
FFN_KINDS = ("dense", "expert_choice", "token_choice")
DISPATCHES = ("einsum", "gather")
# dropless token choice: ragged_dot on TPU, tiles elsewhere (ec_dit.moe.grouped)
DROPLESS_IMPLS = ("auto", "ragged_dot", "tiles")
ACTIVATIONS = ("gelu", "swiglu")
DTYPES = ("float32", "bfloat16")
OPTIMIZERS = ("adamw", "muon")
PREDICTIONS = ("velocity", "x0", "epsilon")  # what the network outputs (ec_dit.model.dit)
CONDITIONINGS = ("adaln_zero", "adaln_single")  # per-block adaLN-Zero (DiT) or PixArt-alpha's adaLN-single
POSITIONS = ("ec_dit", "pixart")  # 2-D sin-cos order and scaling (ec_dit.model.embeddings)
DDPM_SAMPLERS = ("ddpm", "ddim")  # text-to-image samplers of prediction="epsilon" models (ec_dit.diffusion.text_ddpm)
DDPM_TIMESTEPS = 1000  # prediction="epsilon": PixArt-alpha's (and DiT's) linear betas 1e-4..0.02 over 1000 steps
REMAT_POLICIES = ("none", "full", "dots")  # activation checkpointing per block (ec_dit.model.dit)
TOKENIZERS = ("words", "bytes")
TEXT_ENCODERS = ("trainable", "t5")  # trained with the DiT, or frozen T5 features prepared beforehand
SAMPLERS = ("euler", "heun", "ancestral")
# GenEval's six tasks; ShapesWorld's captions add plain descriptive ones.
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
CAPTION_TASKS = TASKS + ("descriptive",)
GENEVAL_DOMAINS = ("shapes", "coco")
# Mesh axes, outermost first, and the default logical-axis -> mesh-axes rules (ec_dit.sharding).
MESH_AXES = ("data", "fsdp", "expert", "tensor")
# Parameters: expert, expert_mlp, mlp, heads, embed, vocab, patch, modulation,
# unmodeled. Activations: batch (images, or routing groups before dispatch),
# expert_group (routing groups after dispatch: the batch minus the expert axis,
# which then holds the experts).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp", "expert")),
    ("expert_group", ("data", "fsdp")),
    ("expert", "expert"),
    ("expert_mlp", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("embed", "fsdp"),
    ("vocab", None),
    ("patch", None),
    ("modulation", None),
    ("unmodeled", None),
    ("channels", "fsdp"),  # VAE conv / norm / attention channels (ec_dit.encoders.vae): FSDP-split like embed
    ("kernel_spatial", None),  # conv kernel height and width (ec_dit.encoders.vae)
)
SOURCE_KINDS = ("shapes_world", "tfds", "folder", "jsonl", "latents")
SOURCE_FORMS = ('"shapes_world"', '"tfds:NAME[/CONFIG][:VERSION][:SPLIT]"', '"folder:PATH"', '"jsonl:PATH"',
                '"latents:DIR"')
PREPARE_README = 'README section "Train EC-DiT on your own data"'  # where errors about missing paths point
MIN_IMAGE_SIZE = 8

VARIANTS = {
    "ec": "expert choice (EC-DiT), the default",
    "ec_batch": "expert choice with one routing group over the whole batch (EC-DiT's setting)",
    "tc": "token choice top-2, no shared experts: activated compute matched to ec",
    "tc_cap2": "token choice top-2 with capacity factor 2 (overflowing choices dropped), no shared experts",
    "dit_moe": "DiT-MoE's recipe: token choice top-2 plus 2 shared experts, balance loss 0.01",
    "dense": "dense FFN of width capacity_factor x mlp_ratio x hidden at the MoE positions: matched to ec",
}


# -- Sections ------------------------------------------------------------------
def model_defaults() -> ml_collections.ConfigDict:
  """Defaults of `config.model`: a DiT-XL/2-sized EC-DiT on a 32x32x4 latent."""
  return ml_collections.ConfigDict(dict(
      arch="ec_dit",          # "ec_dit" (text-to-image) or "dit_moe" (class-conditional); schema.class_cond
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
      long_skips=False,       # U-ViT long skip connections from the first to the last blocks
      prediction="velocity",  # what the network outputs: one of PREDICTIONS ("epsilon": DDPM, PixArt-alpha)
      learn_sigma=False,      # prediction="epsilon": 2C output channels, the second C the learned variance
      conditioning="adaln_zero",  # one of CONDITIONINGS; "adaln_single" is PixArt-alpha's (one t-MLP for all blocks)
      micro_conditions=False,  # adaln_single: PixArt-alpha 1024's resolution and aspect-ratio embeddings
      positions="ec_dit",     # one of POSITIONS; "pixart" for imported PixArt-alpha weights
      pos_interpolation_scale=1.0,  # positions="pixart": coordinates divided by it (2 in PixArt's 1024 px model)
      dtype="float32",        # compute dtype; parameters stay float32
      remat_policy="none",    # activation checkpointing per block: one of REMAT_POLICIES
      ffn=dict(
          kind="expert_choice",
          activation="gelu",
          num_experts=32,
          moe_every=2,          # MoE in layers 2, 4, ... (1-based)
          dense_first_n=0,      # Nucleus-Image keeps the first layers dense
          decoupled_routing=False,
          dispatch="einsum",
          routing_group_size=0,  # tokens per routing group; 0 = one group per image, -1 = the whole batch
          router_z_loss_coef=0.0,
          # expert choice
          train_capacity_factor=2.0,
          eval_capacity_factor=2.0,
          # token choice (DiT-MoE)
          top_k=2,
          num_shared_experts=2,
          token_capacity_factor=0.0,  # 0 = dropless
          dropless_impl="auto",       # grouped matmuls of dropless token choice: one of DROPLESS_IMPLS
          renormalize_gates=False,
          balance_loss_coef=0.01,
          # dense kind: width of the FFN at the MoE positions, as a multiple of hidden
          dense_mlp_ratio=4.0,
      ),
      class_cond=class_cond_model_defaults(),  # read when arch == "dit_moe"
  ))


def paper_config(hidden_size: int, depth: int, num_heads: int, num_experts: int) -> ml_collections.ConfigDict:
  """A whole paper config: `paper_model` trained on prepared SD-VAE latents and T5-XXL features
  (`config.input.source = "latents:DIR"` and `config.encoders.*` must be set), scored on
  GenEval's official prompts (the COCO domain; seed 43 reproduces GenEval's file)."""
  config = base_config()
  config.model = paper_model(hidden_size, depth, num_heads, num_experts)
  config.text.encoder = "t5"
  config.input.source = "latents:"  # not set: `python -m ec_dit.prepare` writes the folder
  config.input.image_size = 256
  config.geneval.domain, config.geneval.prompt_seed = "coco", 43
  return config


def paper_model(hidden_size: int, depth: int, num_heads: int, num_experts: int) -> ml_collections.ConfigDict:
  """EC-DiT's paper setting at a given size: 256x256 images as a 32x32x4 latent, patch 2
  (256 tokens), expert choice with capacity factor 2, MoE every other layer, experts
  2-layer GELU FFNs of width 4d."""
  m = model_defaults()
  m.hidden_size, m.depth, m.num_heads = hidden_size, depth, num_heads
  m.ffn.num_experts = num_experts
  return m


def input_defaults() -> ml_collections.ConfigDict:
  """The `config.input` section with its defaults (read by `ec_dit.data`).

  Fields:
    source: where examples come from: "shapes_world", "tfds:NAME[/CONFIG][:VERSION][:SPLIT]",
      "folder:PATH" or "jsonl:PATH" (see `ec_dit.data.sources`).
    image_size: output height = width in pixels (resize + centre crop for
      file/TFDS sources; ShapesWorld renders at this size).
    num_examples: ShapesWorld only: length of the procedural source (an epoch).
    data_seed: ShapesWorld only: the procedural seed (which scenes exist).
    shapes_world_tasks: ShapesWorld only: the caption tasks, drawn uniformly
      (a task listed twice is drawn twice as often); any of CAPTION_TASKS.
    shuffle: shuffle the examples (reshuffled every epoch).
    worker_count: grain worker processes (`mp_prefetch`); 0 keeps
      everything in-process (deterministic, CI-friendly).
    read_threads: threads preparing batches in each process (0 = the consumer's thread).
    prefetch_buffer_size: batches prepared ahead per process.
    tfds_data_dir: TFDS data dir ("" = TFDS's default).
    image_key / caption_key: feature names of the image and caption (TFDS,
      JSONL and folder `*.jsonl` records).
    skip_bad_examples: False (default): an image that cannot be decoded or a
      caption that is not UTF-8 stops the run naming the file. True: each such
      example is replaced by the next good one in source order, counted in
      metrics.jsonl (`input/bad_examples`) and reported.
  """
  return ml_collections.ConfigDict(dict(
      source="shapes_world",
      image_size=32,
      num_examples=1_000_000,
      data_seed=0,
      shapes_world_tasks=CAPTION_TASKS,  # the six GenEval templates and "descriptive"
      shuffle=True,
      worker_count=0,
      read_threads=2,
      prefetch_buffer_size=4,
      tfds_data_dir="",
      image_key="image",
      caption_key="caption",
      skip_bad_examples=False,
  ))


def mesh_defaults() -> ml_collections.ConfigDict:
  """Defaults of `config.mesh`: all devices on `data` (single-device training unchanged)."""
  return ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1, rules=DEFAULT_RULES))


def base_config() -> ml_collections.ConfigDict:
  """The full schema with defaults: every key a config file may set."""
  config = ml_collections.ConfigDict()
  config.model = model_defaults()
  config.text = ml_collections.ConfigDict(dict(
      encoder="trainable",  # one of TEXT_ENCODERS; "t5": the model reads prepared T5 features
      tokenizer="words",   # trainable encoder: one of TOKENIZERS, "words" (hashed, any Unicode) or "bytes"
      vocab_size=4096,
      depth=2,             # trainable encoder layers; width = model.context_dim
      num_heads=4,
  ))
  config.input = input_defaults()
  # Frozen pretrained encoders (ec_dit.encoders), local Hugging Face folders: `python -m ec_dit.prepare`
  # encodes a dataset with them, and a run with text.encoder = "t5" samples with them.
  config.encoders = ml_collections.ConfigDict(dict(
      t5_path="",        # a T5 v1.1 encoder folder (config.json, weights, spiece.model or tokenizer.json)
      vae_path="",       # a diffusers AutoencoderKL folder (config.json, diffusion_pytorch_model.safetensors)
      dtype="float32",   # compute and parameter dtype of both: one of DTYPES
      batch_size=16,     # images (or prompts) per jitted encoder / decoder call
  ))
  # Where an upcycled run's MoE came from (ec_dit.upcycle); written by the upcycler, read by nobody.
  config.upcycled = ml_collections.ConfigDict(dict(
      source="",             # the dense run or checkpoint ("" = not upcycled)
      source_step=-1,        # its checkpoint step
      num_experts=0, routing="",
      router_init="",        # "normal" (DiT-MoE's upcycle.py: N(0, 0.02)) or "zeros"
      optimizer_state="",    # "reset" (fresh optimizer, step 0) or "carry" (step and moments copied)
  ))
  config.mesh = mesh_defaults()  # device mesh and logical-to-mesh rules (ec_dit.sharding)
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
  config.optimizer = "adamw"  # or "muon": Muon on hidden matrices, AdamW on the rest (ec_dit.training.muon)
  config.muon = ml_collections.ConfigDict(dict(
      beta=0.95,      # Nesterov momentum
      ns_steps=5,     # Newton-Schulz iterations
      experts=True,   # expert matrices too (else AdamW for them)
  ))
  config.ema_decay = 0.9999
  config.class_diffusion = class_diffusion_defaults()  # DDPM / rectified flow of class-conditional models
  config.log_every_steps = 100
  config.checkpoint_every_steps = 5000
  config.keep_checkpoints = 3
  config.eval_every_steps = 5000     # sample grids, and one at the last step; 0 = none
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
  config.heldout = heldout_defaults()  # the held-out loss (ec_dit.training.heldout)
  return config


def apply_variant(config: ml_collections.ConfigDict, variant: str | None) -> ml_collections.ConfigDict:
  """Applies a named FFN variant (the `file.py:VARIANT` part of --config) in place; see VARIANTS."""
  f = config.model.ffn
  if variant in (None, "", "ec"):
    f.kind = "expert_choice"
  elif variant == "ec_batch":
    f.kind, f.routing_group_size = "expert_choice", -1
  elif variant == "tc":
    f.kind, f.top_k, f.num_shared_experts = "token_choice", 2, 0
  elif variant == "tc_cap2":
    f.kind, f.top_k, f.num_shared_experts, f.token_capacity_factor = "token_choice", 2, 0, 2.0
  elif variant == "dit_moe":
    f.kind, f.top_k, f.num_shared_experts, f.balance_loss_coef = "token_choice", 2, 2, 0.01
  elif variant == "dense":
    f.kind = "dense"
    f.dense_mlp_ratio = f.train_capacity_factor * config.model.mlp_ratio
  else:
    raise ValueError(f"config variant must be one of {sorted(VARIANTS)}, got {variant!r}")
  return config
