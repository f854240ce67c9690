"""Imports diffusers `PixArtTransformer2DModel` folders (PixArt-alpha) into the text-to-image DiT.

    from ec_dit.convert import pixart
    model, config = pixart.load("PixArt-XL-2-512x512/transformer")
    out, aux = model(x_nhwc, t, t5_features, t5_mask)      # out = diffusers' .sample, NHWC

    python -m ec_dit.convert pixart --checkpoint DIR --out RUN [--upcycle_experts=E --routing=ec|tc]

The folder holds `config.json` and `diffusion_pytorch_model.safetensors` (or its
shards and `.safetensors.index.json`); a pipeline folder with a `transformer/`
subfolder works too. The config.json's architecture fields are checked against
what the model implements (adaLN-single, GELU-tanh FFN, no affine norms at eps
1e-6, biased attention, caption projection), then every tensor is mapped name by
name (`ec_dit.convert.mapping`): a missing, unexpected or mis-shaped tensor is an
error naming it. The model is `schema.pixart_alpha_config`'s (`configs/pixart_alpha.py`)
at the folder's sizes: prediction "epsilon" with learned sigma, timesteps 0..999
as diffusers takes them.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from ec_dit import schema, tasks
from ec_dit.convert import mapping
from ec_dit.encoders import hf_checkpoint
from ec_dit.model import text_to_image

WEIGHTS_STEM = "diffusion_pytorch_model"
# config.json fields whose value this model implements (anything else is refused)
REQUIRED = {"norm_type": "ada_norm_single", "activation_fn": "gelu-approximate", "norm_elementwise_affine": False,
            "attention_bias": True, "upcast_attention": False, "attention_type": "default", "_class_name":
            "PixArtTransformer2DModel"}


def read_folder(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json, {name: float32 array}) of a diffusers transformer folder (or a pipeline's transformer/)."""
  folder = hf_checkpoint.model_folder(path, "transformer")
  cfg = hf_checkpoint.read_config(folder)
  reader = hf_checkpoint.open_weights(folder, (WEIGHTS_STEM,))
  try:
    tensors = {name: np.asarray(reader.read(name), np.float32) for name in reader.names()}
  finally:
    reader.close()
  return cfg, tensors


def config_from_diffusers(cfg: dict) -> ml_collections.ConfigDict:
  """Our run config for a diffusers PixArtTransformer2DModel config.json (ValueError naming a field we lack)."""
  for field, value in REQUIRED.items():
    if field in cfg and cfg[field] != value:
      raise hf_checkpoint.unsupported(field, cfg[field], value)
  if abs(cfg.get("norm_eps", 1e-6) - 1e-6) > 1e-12:
    raise hf_checkpoint.unsupported("norm_eps", cfg["norm_eps"], 1e-6)
  heads, head_dim = cfg.get("num_attention_heads", 16), cfg.get("attention_head_dim", 72)
  d, in_channels = heads * head_dim, cfg.get("in_channels", 4)
  out_channels = cfg.get("out_channels") or in_channels
  if out_channels not in (in_channels, 2 * in_channels):
    raise hf_checkpoint.unsupported("out_channels", out_channels, f"{in_channels} or {2 * in_channels} (learned sigma)")
  if cfg.get("cross_attention_dim", d) != d:
    raise hf_checkpoint.unsupported("cross_attention_dim", cfg["cross_attention_dim"], d)
  if not cfg.get("caption_channels"):
    raise hf_checkpoint.unsupported("caption_channels", cfg.get("caption_channels"), "the T5 width (e.g. 4096)")
  sample_size = cfg.get("sample_size", 128)
  micro = cfg.get("use_additional_conditions")
  micro = sample_size == 128 if micro is None else bool(micro)  # diffusers' rule
  interpolation = cfg.get("interpolation_scale")
  interpolation = max(sample_size // 64, 1) if interpolation is None else interpolation
  config = schema.pixart_alpha_config(1024 if micro else 256)
  m = config.model
  m.input_size, m.in_channels, m.patch_size = sample_size, in_channels, cfg.get("patch_size", 2)
  m.hidden_size, m.num_heads, m.depth = d, heads, cfg.get("num_layers", 28)
  m.context_dim, m.learn_sigma, m.micro_conditions = cfg["caption_channels"], out_channels == 2 * in_channels, micro
  m.pos_interpolation_scale = float(interpolation)
  config.input.image_size = sample_size * 8
  return config


def map_tensors(tensors: dict[str, np.ndarray], config, origin: str) -> dict:
  """diffusers' PixArt names -> our TextToImage parameter tree (float32 numpy), checked against `config`."""
  mp = mapping.Mapping(tensors, origin)
  w = tensors.get("transformer_blocks.0.ff.net.0.proj.weight")
  if w is not None:  # the FFN width is not in config.json
    config.model.mlp_ratio = config.model.ffn.dense_mlp_ratio = w.shape[0] / config.model.hidden_size
  mp.conv_patch(("dit", "patch_embed", "proj"), "pos_embed.proj")
  mp.linear(("dit", "t_embed", "fc1"), "adaln_single.emb.timestep_embedder.linear_1")
  mp.linear(("dit", "t_embed", "fc2"), "adaln_single.emb.timestep_embedder.linear_2")
  if config.model.micro_conditions:
    for ours, theirs in (("resolution_embed", "resolution_embedder"), ("aspect_embed", "aspect_ratio_embedder")):
      for i in (1, 2):
        mp.linear(("dit", ours, f"fc{i}"), f"adaln_single.emb.{theirs}.linear_{i}")
  mp.linear(("dit", "t_block"), "adaln_single.linear")
  mp.linear(("dit", "context_embed", "fc1"), "caption_projection.linear_1")
  mp.linear(("dit", "context_embed", "fc2"), "caption_projection.linear_2")
  for i in range(config.model.depth):
    b, ours = f"transformer_blocks.{i}", ("dit", "blocks", i)
    mp.copy(ours + ("scale_shift_table",), f"{b}.scale_shift_table")
    mp.linear(ours + ("attn", "qkv"), f"{b}.attn1.to_q", f"{b}.attn1.to_k", f"{b}.attn1.to_v")
    mp.linear(ours + ("attn", "out"), f"{b}.attn1.to_out.0")
    mp.linear(ours + ("cross_attn", "q"), f"{b}.attn2.to_q")
    mp.linear(ours + ("cross_attn", "kv"), f"{b}.attn2.to_k", f"{b}.attn2.to_v")
    mp.linear(ours + ("cross_attn", "out"), f"{b}.attn2.to_out.0")
    mp.linear(ours + ("ffn", "wi"), f"{b}.ff.net.0.proj")
    mp.linear(ours + ("ffn", "wo"), f"{b}.ff.net.2")
  mp.copy(("dit", "final", "scale_shift_table"), "scale_shift_table")
  mp.linear(("dit", "final", "proj"), "proj_out")
  return mp.finish(text_to_image.abstract_params(config))


def convert(path: str) -> tuple[dict, ml_collections.ConfigDict]:
  """(parameter tree, config) of a diffusers PixArt folder; CheckpointMismatch / CheckpointError on a bad one."""
  cfg, tensors = read_folder(path)
  config = config_from_diffusers(cfg)
  params = map_tensors(tensors, config, path)
  tasks.validate(config)
  return params, config


def load(path: str):
  """`(model, config)`: the TextToImage model (T5 features in, `text.encoder="t5"`) with the folder's weights.

  `out, aux = model(x_nhwc, t, context, context_mask)` with t the DDPM timestep
  (0..999, as diffusers takes it) and context the T5 features; `out` is
  diffusers' `.sample` in NHWC (noise, then the learned-sigma channels).
  """
  params, config = convert(path)
  return mapping.with_weights(text_to_image.abstract_model(config), params), config
