"""Imports DiT (Peebles & Xie 2023) into the class-conditional model with DiT's dense GELU FFN.

    from ec_dit.convert import dit
    model, config = dit.load("DiT-XL-2-256x256.pt")     # facebookresearch/DiT's released state dict
    model, config = dit.load("DiT-XL-2-256/transformer")  # a diffusers DiTTransformer2DModel folder
    out, aux = model(x_nhwc, t, labels)                  # t: 0..999 as DiT and diffusers take it

    python -m ec_dit.convert dit --checkpoint FILE_OR_DIR --out RUN [--upcycle_experts=E --routing=ec|tc]

A `.pt` file is read through the restricted unpickler (`ec_dit.convert.torch_pickle`,
never running code from the file): the state dict itself, or a training
checkpoint's "ema" (else "model") entry. The number of heads is not in a state
dict: it is DiT's for the released widths (`DIT_HEADS`) or `num_heads=`.
A diffusers folder gives every size in its config.json; its port embeds
timesteps with `downscale_freq_shift=1` and normalises before the FFN with
eps 1e-5 (`norm_eps`), which the config reproduces (`class_cond.timestep_shift`,
`mlp_norm_eps`). diffusers stores a copy of the timestep and label embedders in
every block; they must all equal block 0's (the checkpoint is refused naming the
first that differs). Every tensor is checked by name and shape
(`ec_dit.convert.mapping`).
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np

from ec_dit import schema, tasks
from ec_dit.convert import dit_moe as dit_moe_convert, mapping, pixart
from ec_dit.encoders import hf_checkpoint
from ec_dit.model import dit_moe

DIT_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}  # DiT-S, B, L, XL (models.py)


def base_config(*, hidden: int, depth: int, heads: int, input_size: int, patch: int, in_channels: int,
                num_classes: int, learn_sigma: bool, mlp_ratio: float) -> ml_collections.ConfigDict:
  """The class-conditional config of a dense DiT (ffn_style "dit", DDPM with DiT's sampling settings)."""
  config = schema.base_config()
  m = config.model
  m.arch = "dit_moe"
  m.input_size, m.in_channels, m.patch_size = input_size, in_channels, patch
  m.hidden_size, m.depth, m.num_heads, m.mlp_ratio = hidden, depth, heads, mlp_ratio
  c = m.class_cond
  c.num_classes, c.class_dropout, c.learn_sigma, c.ffn_style = num_classes, 0.1, learn_sigma, "dit"
  f = m.ffn
  f.kind, f.activation, f.num_shared_experts, f.moe_every, f.dense_first_n = "dense", "gelu", 0, 2, 0
  f.dense_mlp_ratio, f.dispatch = mlp_ratio, "gather"
  d = config.class_diffusion
  d.objective, d.sampler, d.num_sampling_steps, d.guidance_scale, d.guidance_channels = "ddpm", "ddpm", 250, 4.0, 3
  d.class_labels = tuple(y % num_classes for y in d.class_labels)
  config.input.source, config.input.image_size = "latents:", input_size * 8
  config.optimizer, config.learning_rate, config.weight_decay, config.warmup_steps = "adamw", 1e-4, 0.0, 0
  return config


def _facebook_config(sd: dict, num_heads: int | None) -> ml_collections.ConfigDict:
  try:
    w = sd["x_embedder.proj.weight"]
    hidden, c, patch, _ = w.shape
    out = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
    grid = int(round(np.sqrt(sd["pos_embed"].shape[-2]))) if "pos_embed" in sd else None
    rows = sd["y_embedder.embedding_table.weight"].shape[0]
    mlp = sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden
  except KeyError as e:
    raise mapping.CheckpointMismatch(f"not a DiT state dict (models.py): no tensor {e.args[0]}") from None
  if grid is None:
    raise mapping.CheckpointMismatch("not a DiT state dict: no pos_embed (it gives the input size)")
  heads = num_heads or DIT_HEADS.get(hidden)
  if heads is None:
    raise ValueError(f"hidden size {hidden} is not one of DiT's {sorted(DIT_HEADS)}: pass num_heads (--num_heads)")
  return base_config(hidden=hidden, depth=mapping.count_indexed(sd, r"blocks\.(\d+)\."), heads=heads,
                     input_size=grid * patch, patch=patch, in_channels=c, num_classes=rows - 1,
                     learn_sigma=out == 2 * c, mlp_ratio=mlp)


def _map_facebook(sd: dict, config, origin: str) -> dict:
  mp = mapping.Mapping(sd, origin)
  mp.conv_patch(("patch_embed", "proj"), "x_embedder.proj")
  mp.linear(("t_embed", "fc1"), "t_embedder.mlp.0")
  mp.linear(("t_embed", "fc2"), "t_embedder.mlp.2")
  mp.copy(("y_embed", "table"), "y_embedder.embedding_table.weight")
  for i in range(config.model.depth):
    b = f"blocks.{i}"
    mp.linear(("blocks", i, "adaln"), f"{b}.adaLN_modulation.1")
    mp.linear(("blocks", i, "attn", "qkv"), f"{b}.attn.qkv")
    mp.linear(("blocks", i, "attn", "proj"), f"{b}.attn.proj")
    mp.linear(("blocks", i, "mlp", "wi"), f"{b}.mlp.fc1")
    mp.linear(("blocks", i, "mlp", "wo"), f"{b}.mlp.fc2")
  mp.linear(("final", "adaln"), "final_layer.adaLN_modulation.1")
  mp.linear(("final", "proj"), "final_layer.linear")
  params = mp.finish(dit_moe.abstract_params(config), ignore=lambda n: n == "pos_embed")
  grid = config.model.input_size // config.model.patch_size
  theirs = np.asarray(sd["pos_embed"], np.float32).reshape(-1, config.model.hidden_size)
  if not np.allclose(theirs, dit_moe.dit_pos_embed(config.model.hidden_size, grid), atol=1e-4):
    raise mapping.CheckpointMismatch(f"{origin}: pos_embed is not DiT's fixed sin-cos embedding of a "
                                     f"{grid}x{grid} grid")
  return params


def _diffusers_config(cfg: dict) -> ml_collections.ConfigDict:
  for field, value in (("norm_type", "ada_norm_zero"), ("activation_fn", "gelu-approximate"),
                       ("attention_bias", True), ("norm_elementwise_affine", False)):
    if field in cfg and cfg[field] != value:
      raise hf_checkpoint.unsupported(field, cfg[field], value)
  heads, c = cfg.get("num_attention_heads", 16), cfg.get("in_channels", 4)
  out = cfg.get("out_channels") or c
  if out not in (c, 2 * c):
    raise hf_checkpoint.unsupported("out_channels", out, f"{c} or {2 * c} (learned sigma)")
  config = base_config(hidden=heads * cfg.get("attention_head_dim", 72), depth=cfg.get("num_layers", 28), heads=heads,
                       input_size=cfg.get("sample_size", 32), patch=cfg.get("patch_size", 2), in_channels=c,
                       num_classes=cfg.get("num_embeds_ada_norm", 1000), learn_sigma=out == 2 * c, mlp_ratio=4.0)
  config.model.class_cond.timestep_shift = 1
  config.model.class_cond.mlp_norm_eps = float(cfg.get("norm_eps", 1e-5))
  config.class_diffusion.guidance_channels = 0  # DiTPipeline guides every noise channel
  return config


def _map_diffusers(sd: dict, config, origin: str) -> dict:
  w = sd.get("transformer_blocks.0.ff.net.0.proj.weight")
  if w is not None:
    config.model.mlp_ratio = config.model.ffn.dense_mlp_ratio = w.shape[0] / config.model.hidden_size
  mp = mapping.Mapping(sd, origin)
  emb = "transformer_blocks.0.norm1.emb"
  mp.conv_patch(("patch_embed", "proj"), "pos_embed.proj")
  mp.linear(("t_embed", "fc1"), f"{emb}.timestep_embedder.linear_1")
  mp.linear(("t_embed", "fc2"), f"{emb}.timestep_embedder.linear_2")
  mp.copy(("y_embed", "table"), f"{emb}.class_embedder.embedding_table.weight")
  for i in range(config.model.depth):
    b = f"transformer_blocks.{i}"
    mp.linear(("blocks", i, "adaln"), f"{b}.norm1.linear")
    mp.linear(("blocks", i, "attn", "qkv"), f"{b}.attn1.to_q", f"{b}.attn1.to_k", f"{b}.attn1.to_v")
    mp.linear(("blocks", i, "attn", "proj"), f"{b}.attn1.to_out.0")
    mp.linear(("blocks", i, "mlp", "wi"), f"{b}.ff.net.0.proj")
    mp.linear(("blocks", i, "mlp", "wo"), f"{b}.ff.net.2")
    for name in [n for n in sd if n.startswith(f"{b}.norm1.emb.")] if i else []:
      first = name.replace(f"{b}.", "transformer_blocks.0.", 1)
      if first not in sd or sd[name].shape != sd[first].shape or not np.array_equal(sd[name], sd[first]):
        raise mapping.CheckpointMismatch(f"{origin}: tensor {name} differs from block 0's {first}; this model has "
                                         "one timestep and label embedder (as DiT)")
      mp.used.add(name)
  mp.linear(("final", "adaln"), "proj_out_1")
  mp.linear(("final", "proj"), "proj_out_2")
  return mp.finish(dit_moe.abstract_params(config))


def convert(path: str, *, num_heads: int | None = None,
            weights: str = "auto") -> tuple[dict, ml_collections.ConfigDict]:
  """(parameter tree, config) of a DiT checkpoint: a facebookresearch/DiT `.pt` file or a diffusers folder."""
  if os.path.isdir(path):
    cfg, sd = pixart.read_folder(path)
    if cfg.get("_class_name", "DiTTransformer2DModel") != "DiTTransformer2DModel":
      raise hf_checkpoint.unsupported("_class_name", cfg["_class_name"], "DiTTransformer2DModel")
    config = _diffusers_config(cfg)
    if num_heads:
      config.model.num_heads = num_heads
    params = _map_diffusers(sd, config, path)
  else:
    sd = {k: np.asarray(v, np.float32) for k, v in dit_moe_convert.load_state_dict(path, weights).items()}
    config = _facebook_config(sd, num_heads)
    params = _map_facebook(sd, config, path)
  tasks.validate(config)
  return params, config


def load(path: str, *, num_heads: int | None = None, weights: str = "auto"):
  """`(model, config)`: the class-conditional DiT with the checkpoint's weights, in eval mode.

  `out, aux = model(x_nhwc, t, labels)` (labels in [0, num_classes], the last the
  null class); `out` is DiT's output (diffusers' `.sample`) in NHWC.
  """
  params, config = convert(path, num_heads=num_heads, weights=weights)
  return mapping.with_weights(dit_moe.abstract_model(config), params), config
