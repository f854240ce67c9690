"""PixArt-alpha's part of the schema: its config (`pixart_alpha_config`) and the checks of its model options.

PixArt-alpha is the text-to-image DiT with options (`config.model.conditioning`,
`prediction="epsilon"`, `learn_sigma`, `micro_conditions`, `positions`,
`pos_interpolation_scale`; see `ec_dit.model.dit`). Like the rest of
`ec_dit.schema`, this module imports nothing else from `ec_dit`.
"""

from __future__ import annotations

import ml_collections

from ec_dit.schema.checks import fail, is_number
from ec_dit.schema.defaults import CONDITIONINGS, DDPM_SAMPLERS, DDPM_TIMESTEPS, POSITIONS, paper_config


PIXART_RESOLUTIONS = (256, 512, 1024)  # PixArt-alpha XL/2's released image sizes (configs/pixart_alpha.py)


def pixart_alpha_config(resolution: int = 256) -> ml_collections.ConfigDict:
  """PixArt-alpha XL/2 (Chen et al. 2023) as options of the text-to-image DiT: d 1152, 28 layers, 16 heads,
  a dense GELU FFN of width 4d, adaLN-single, caption projection from T5-XXL (4096) at 120 tokens, an
  epsilon-predicting DDPM with learned sigma (8 channels); the 1024 px model adds micro-conditions and
  positions at interpolation scale 2. Sampled with DDIM (`ec_dit.diffusion.text_ddpm`) and guidance 4.5."""
  if resolution not in PIXART_RESOLUTIONS:
    raise ValueError(f"PixArt-alpha resolution must be one of {PIXART_RESOLUTIONS}, got {resolution!r}")
  config = paper_config(hidden_size=1152, depth=28, num_heads=16, num_experts=32)
  m = config.model
  m.input_size = resolution // 8
  m.ffn.kind, m.ffn.activation, m.ffn.dense_mlp_ratio = "dense", "gelu", m.mlp_ratio
  m.prediction, m.learn_sigma, m.conditioning, m.positions = "epsilon", True, "adaln_single", "pixart"
  m.micro_conditions = resolution == 1024  # diffusers: use_additional_conditions = (sample_size == 128)
  m.pos_interpolation_scale = float(max(m.input_size // 64, 1))
  config.input.image_size = resolution
  config.sample.sampler, config.sample.num_steps, config.sample.guidance_scale = "ddim", 50, 4.5
  config.optimizer, config.learning_rate, config.weight_decay = "adamw", 2e-5, 0.03  # PixArt-alpha's fine-tuning
  return config


def validate_pixart_options(m, prefix: str) -> None:
  """The PixArt-alpha options of the text-to-image DiT (conditioning, learned sigma, micro-conditions, positions)."""
  if m.conditioning not in CONDITIONINGS:
    fail(f"{prefix}.conditioning", f"one of {CONDITIONINGS}", m.conditioning)
  for name in ("learn_sigma", "micro_conditions"):
    if not isinstance(m[name], bool):
      fail(f"{prefix}.{name}", "True or False", m[name])
  if m.learn_sigma and m.prediction != "epsilon":
    fail(f"{prefix}.learn_sigma", "False unless prediction='epsilon' (a learned variance is a DDPM output)",
         m.learn_sigma)
  if m.micro_conditions and m.conditioning != "adaln_single":
    fail(f"{prefix}.micro_conditions", "False unless conditioning='adaln_single' (PixArt-alpha's)",
         m.micro_conditions)
  if m.micro_conditions and m.hidden_size % 3:
    fail(f"{prefix}.hidden_size", "divisible by 3 with micro_conditions (three d/3 embeddings)", m.hidden_size)
  if m.positions not in POSITIONS:
    fail(f"{prefix}.positions", f"one of {POSITIONS}", m.positions)
  if not is_number(m.pos_interpolation_scale) or m.pos_interpolation_scale <= 0:
    fail(f"{prefix}.pos_interpolation_scale", "a number > 0", m.pos_interpolation_scale)


def check_sampler(sample, prediction: str, flow_samplers) -> None:
  """`config.sample.sampler`: one of `flow_samplers`, or for a prediction="epsilon" model a DDPM sampler with at
  most DDPM_TIMESTEPS respaced steps."""
  if prediction != "epsilon":
    if sample.sampler not in flow_samplers:
      fail("sample.sampler", f"one of {flow_samplers}", sample.sampler)
    return
  if sample.sampler not in DDPM_SAMPLERS:
    fail("sample.sampler", f"one of {DDPM_SAMPLERS} with model.prediction='epsilon'", sample.sampler)
  if sample.num_steps > DDPM_TIMESTEPS:
    fail("sample.num_steps", f"at most {DDPM_TIMESTEPS} (respaced DDPM steps)", sample.num_steps)
