"""DiT-MoE (feizc/DiT-MoE) at its released sizes: class-conditional ImageNet 256x256 as 32x32x4 latents.

    --config=configs/dit_moe.py:S-8E2A     DiT-MoE-S/2-8E2A   (dit_moe_s_8E2A.pt,  DDPM)
    --config=configs/dit_moe.py:S-16E2A    DiT-MoE-S/2-16E2A  (dit_moe_s_16E2A.pt, DDPM)
    --config=configs/dit_moe.py:B-8E2A     DiT-MoE-B/2-8E2A   (dit_moe_b_8E2A.pt,  DDPM)
    --config=configs/dit_moe.py:XL-8E2A    DiT-MoE-XL/2-8E2A  (dit_moe_xl_8E2A.pt, rectified flow)
    --config=configs/dit_moe.py:G-16E2A    DiT-MoE-G/2-16E2A  (dit_moe_g_16E2A.pt, rectified flow)

Append `-ec` to a variant (e.g. `S-8E2A-ec`) for the same network routed by expert
choice at capacity factor 2 (as many expert evaluations per token on average as top-2).

The sizes are DiT's (`DiT_S_2` ... `DiT_G_2` in DiT-MoE's models.py). The XL and G
checkpoints were trained with DiT-MoE's flash-attention blocks (LayerNorm on q and k:
`qk_norm`) and its rectified flow (`rectified_flow.py`, sampled with 50 Euler steps and
guidance 7 in its sample.py); S and B with DiT's DDPM (sampled with 250 respaced steps).
Training settings are DiT's: AdamW at a constant 1e-4, no weight decay, EMA 0.9999,
global batch 256.
"""

from ec_dit import schema

# variant -> (depth, hidden_size, num_heads, num_experts, objective)
SIZES = {
    "S-8E2A": (12, 384, 6, 8, "ddpm"),
    "S-16E2A": (12, 384, 6, 16, "ddpm"),
    "B-8E2A": (12, 768, 12, 8, "ddpm"),
    "XL-8E2A": (28, 1152, 16, 8, "rectified_flow"),
    "G-16E2A": (40, 1408, 16, 16, "rectified_flow"),
}


def get_config(variant=None):
  variant = variant or "S-8E2A"
  name, ec = (variant[:-3], True) if variant.endswith("-ec") else (variant, False)
  if name not in SIZES:
    raise ValueError(f"configs/dit_moe.py variant must be one of {sorted(SIZES)} (optionally with -ec), "
                     f"got {variant!r}")
  depth, d, heads, experts, objective = SIZES[name]
  config = schema.base_config()
  m = config.model
  m.arch = "dit_moe"
  m.input_size, m.in_channels, m.patch_size = 32, 4, 2
  m.hidden_size, m.depth, m.num_heads, m.mlp_ratio = d, depth, heads, 4.0
  m.class_cond.num_classes, m.class_cond.class_dropout, m.class_cond.learn_sigma = 1000, 0.1, True
  m.class_cond.qk_norm = objective == "rectified_flow"  # XL and G: DiT-MoE's flash-attention blocks
  f = m.ffn
  f.kind = "expert_choice" if ec else "token_choice"
  f.activation, f.num_experts, f.top_k = "swiglu", experts, 2
  f.moe_every, f.dense_first_n = 1, 0
  f.num_shared_experts = 2          # one shared SwiGLU expert of width 2d (DiT-MoE's n_shared_experts)
  f.renormalize_gates = False       # norm_topk_prob = False
  f.token_capacity_factor = 0.0     # dropless, as DiT-MoE
  f.balance_loss_coef = 0.01        # aux_loss_alpha
  f.train_capacity_factor = f.eval_capacity_factor = 2.0
  f.dispatch = "gather"

  c = config.class_diffusion
  c.objective = objective
  if objective == "ddpm":
    c.sampler, c.num_sampling_steps, c.guidance_scale, c.guidance_channels = "ddpm", 250, 4.0, 3
  else:
    c.sampler, c.num_sampling_steps, c.guidance_scale, c.guidance_channels = "euler", 50, 7.0, 0

  config.input.image_size = 256  # prepared with the SD VAE: 32x32x4 latents (`python -m ec_dit.prepare`)
  config.batch_size = 256
  config.learning_rate = 1e-4
  config.warmup_steps = 0
  config.weight_decay = 0.0
  config.optimizer = "adamw"
  config.ema_decay = 0.9999
  config.num_train_steps = 400_000
  config.mesh.expert = 1  # e.g. --config.mesh.expert=8 for expert parallelism
  return config
