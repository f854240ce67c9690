"""The class-conditional (DiT-MoE) part of the schema: defaults and validation.

Two pieces of the config belong to class-conditional models:

* `config.model.class_cond` holds the fields only the class-conditional network
  (DiT-MoE's, `ec_dit.model.dit_moe`) reads. Which network a config trains,
  `config.model.arch`, is the task registry's to read (`ec_dit.tasks`): checks
  that depend on it are the task's (`Task.validate`), not the schema's.
* `config.class_diffusion` holds its diffusion process and sampler
  (`ec_dit.diffusion.ddpm`, `ec_dit.diffusion.class_labels`).

Like the rest of `ec_dit.schema`, this module imports nothing else from `ec_dit`
(not even `ec_dit.schema.validation`, which imports it).
"""

from __future__ import annotations

import ml_collections

from ec_dit.schema.checks import fail, is_int, is_number

CLASS_OBJECTIVES = ("ddpm", "rectified_flow")   # DiT's gaussian diffusion, DiT-MoE's rectified_flow.py
CLASS_SAMPLERS = {"ddpm": ("ddpm", "ddim"), "rectified_flow": ("euler",)}
DIT_MOE_FFN_KINDS = ("token_choice", "expert_choice")
FFN_STYLES = ("dit_moe", "dit")
DIT_FFN_KINDS = ("dense", "token_choice", "expert_choice")  # ffn_style="dit": dense, or upcycled at the MoE positions


def class_cond_model_defaults() -> ml_collections.ConfigDict:
  """`config.model.class_cond`: read only when `config.model.arch == "dit_moe"`."""
  return ml_collections.ConfigDict(dict(
      num_classes=1000,     # labels 0..num_classes-1; index num_classes is the null class (guidance)
      class_dropout=0.1,    # labels replaced by the null class while training
      learn_sigma=True,     # output 2C channels: noise and the learned-range variance
      qk_norm=False,        # LayerNorm (with affine) on q and k per head: DiT-MoE's flash-attention
                            # blocks, which its XL/2 and G/2 checkpoints were trained with
      ffn_style="dit_moe",  # one of FFN_STYLES: DiT-MoE's SwiGLU experts, or DiT's GELU MLP ("dit", ec_dit.convert.dit)
      timestep_shift=0,     # diffusers' downscale_freq_shift of the timestep features: 0 (DiT), 1 (diffusers' DiT)
      mlp_norm_eps=1e-6,    # epsilon of the LayerNorm before the FFN: 1e-6 (DiT), 1e-5 (diffusers' DiT default)
  ))


def class_diffusion_defaults() -> ml_collections.ConfigDict:
  """`config.class_diffusion`: the diffusion process and sampler of a class-conditional model."""
  return ml_collections.ConfigDict(dict(
      objective="ddpm",         # one of CLASS_OBJECTIVES
      num_timesteps=1000,       # DDPM: linear betas from beta_start to beta_end
      beta_start=1e-4,
      beta_end=0.02,
      sampler="ddpm",           # ddpm (ancestral) or ddim for "ddpm"; euler for "rectified_flow"
      num_sampling_steps=250,   # DDPM/DDIM: respaced steps; rectified flow: Euler steps
      guidance_scale=4.0,       # classifier-free guidance; 1 = none
      # Guided channels: DiT's forward_with_cfg guides only the first 3 of the 4 noise channels
      # ("for exact reproducibility reasons"); its checkpoints' published samples were made so.
      # 0 = every noise channel (standard classifier-free guidance).
      guidance_channels=3,
      class_labels=(207, 360, 387, 974, 88, 979, 417, 279),  # sample grids (DiT-MoE's sample.py)
  ))


def validate_dit_moe_network(config) -> None:
  """Called by the class-conditional task (`ec_dit.tasks`), not by `validate`: the DiT-MoE network has an MoE FFN of SwiGLU experts in every block (or DiT's GELU MLP), so its
  `model.ffn` must say so."""
  m, c, f = config.model, config.model.class_cond, config.model.ffn
  dit = c.ffn_style == "dit"
  kinds, activation, why = ((DIT_FFN_KINDS, "gelu", "DiT's MLP") if dit else
                            (DIT_MOE_FFN_KINDS, "swiglu", "its experts are SwiGLU"))
  where = "class_cond.ffn_style='dit'" if dit else "model.arch='dit_moe'"
  if f.kind not in kinds:
    fail("model.ffn.kind", f"one of {kinds} with {where}", f.kind)
  if f.activation != activation:
    fail("model.ffn.activation", f"'{activation}' with {where} ({why})", f.activation)
  if dit:
    if f.kind != "dense" and f.num_shared_experts:
      fail("model.ffn.num_shared_experts", f"0 with {where}", f.num_shared_experts)
    return
  if f.moe_every != 1 or f.dense_first_n != 0:
    fail("model.ffn.moe_every", "1 (and dense_first_n 0) with model.arch='dit_moe': an MoE in every block",
          (f.moe_every, f.dense_first_n))
  if f.decoupled_routing:
    fail("model.ffn.decoupled_routing", "False with model.arch='dit_moe' (its gate sees the FFN input)",
          f.decoupled_routing)
  if m.prediction != "velocity":
    fail("model.prediction", "'velocity' with model.arch='dit_moe' (the output is the raw network output)",
          m.prediction)


def validate_class_cond(config) -> None:
  """Checks `config.model.class_cond` and `config.class_diffusion` (every config has both sections).

  Raises ValueError naming the first bad field.
  """
  m, c, d = config.model, config.model.class_cond, config.class_diffusion
  if not is_int(c.num_classes) or c.num_classes < 1:
    fail("model.class_cond.num_classes", "a positive integer", c.num_classes)
  if not is_number(c.class_dropout) or not 0.0 <= c.class_dropout < 1.0:
    fail("model.class_cond.class_dropout", "a number in [0, 1)", c.class_dropout)
  for name in ("learn_sigma", "qk_norm"):
    if not isinstance(c[name], bool):
      fail(f"model.class_cond.{name}", "True or False", c[name])
  if c.ffn_style not in FFN_STYLES:
    fail("model.class_cond.ffn_style", f"one of {FFN_STYLES}", c.ffn_style)
  if c.timestep_shift not in (0, 1) or isinstance(c.timestep_shift, bool):
    fail("model.class_cond.timestep_shift", "0 or 1", c.timestep_shift)
  if not is_number(c.mlp_norm_eps) or not 0 < c.mlp_norm_eps < 1:
    fail("model.class_cond.mlp_norm_eps", "a number in (0, 1)", c.mlp_norm_eps)
  if d.objective not in CLASS_OBJECTIVES:
    fail("class_diffusion.objective", f"one of {CLASS_OBJECTIVES}", d.objective)
  if not is_int(d.num_timesteps) or d.num_timesteps < 2:
    fail("class_diffusion.num_timesteps", "an integer >= 2", d.num_timesteps)
  if not (is_number(d.beta_start) and is_number(d.beta_end) and 0.0 < d.beta_start < d.beta_end < 1.0):
    fail("class_diffusion.beta_start", "0 < beta_start < beta_end < 1", (d.beta_start, d.beta_end))
  allowed = CLASS_SAMPLERS[d.objective]
  if d.sampler not in allowed:
    fail("class_diffusion.sampler", f"one of {allowed} with objective={d.objective!r}", d.sampler)
  limit = d.num_timesteps if d.objective == "ddpm" else 10**6
  if not is_int(d.num_sampling_steps) or not 1 <= d.num_sampling_steps <= limit:
    fail("class_diffusion.num_sampling_steps", f"an integer in [1, {limit}]", d.num_sampling_steps)
  if not is_number(d.guidance_scale) or d.guidance_scale < 0:
    fail("class_diffusion.guidance_scale", "a number >= 0 (1 = no guidance)", d.guidance_scale)
  if not is_int(d.guidance_channels) or not 0 <= d.guidance_channels <= m.in_channels:
    fail("class_diffusion.guidance_channels", f"an integer in [0, model.in_channels={m.in_channels}] "
          "(0 = all)", d.guidance_channels)
  labels = d.class_labels
  if isinstance(labels, (str, bytes)) or not all(is_int(y) and 0 <= y < c.num_classes for y in labels):
    fail("class_diffusion.class_labels", f"a list of integers in [0, num_classes={c.num_classes})", labels)
