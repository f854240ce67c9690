"""Model summary from shapes alone: parameters and FLOPs without materialising weights.

The model is built under `nnx.eval_shape`, so only ShapeDtypeStructs exist: the
97B EC-DiT-M summarises on a laptop.

FLOPs count multiply-adds as 2 FLOPs, for matmuls and attention only (norms,
activations, softmax and routing bookkeeping are negligible at these sizes),
for one forward pass of one denoising step of one image. An expert-choice
layer processes E * C = tokens * capacity_factor token-expert pairs; a
token-choice layer tokens * k, plus its shared experts.

For DiT-MoE (`config.model.arch = "dit_moe"`) the counts are of its class-conditional
network; `reference_params` adds the fixed sin-cos `pos_embed` that DiT-MoE's PyTorch
model stores as a parameter (here computed), so it equals DiT-MoE's own count.
"""

from __future__ import annotations

import json
import math
from typing import Any

from flax import nnx

from ec_dit import schema, tasks
from ec_dit.model import dit, dit_moe


def _config_of(model_config):
  config = schema.base_config()
  config.model = model_config
  return config


def _is_class_conditional(model_config) -> bool:
  return tasks.task_for(_config_of(model_config)).conditioning == tasks.CLASS_LABEL


def abstract_dit(model_config) -> dit.DiT | dit_moe.DiTMoE:
  """The diffusion network of `model_config` with ShapeDtypeStructs in place of arrays (no memory allocated):
  the text-to-image model's DiT, or the DiT-MoE network for `arch = "dit_moe"`."""
  config = _config_of(model_config)
  return tasks.task_for(config).abstract_denoiser(config)


def _path_str(path) -> str:
  return "/".join(str(p) for p in path)


def param_table(model: dit.DiT) -> list[tuple[str, tuple[int, ...], tuple[str, ...]]]:
  """(path, shape, logical axes) of every parameter."""
  rows = []
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param):
      rows.append((_path_str(path), tuple(var.shape), tuple(var.get_metadata().get("out_sharding") or ())))
  return rows


def _ffn_pairs_per_token(f) -> float:
  """Routed expert applications per token on average at inference."""
  return f.eval_capacity_factor if f.kind == "expert_choice" else float(f.top_k)


def class_cond_flops_per_image(m) -> int:
  """Forward FLOPs of one denoising step of the DiT-MoE network for one image (no guidance)."""
  d, f = m.hidden_size, m.ffn
  n = (m.input_size // m.patch_size) ** 2
  patch_dim = m.patch_size ** 2 * m.in_channels
  swiglu = lambda width: 2 * 3 * d * width  # noqa: E731 - per token: gate, up, down
  attn = 2 * d * 6 * d + 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d
  if m.class_cond.get("ffn_style", "dit_moe") == "dit":  # DiT's GELU MLP, or an MoE of them at the MoE positions
    mlp = 2 * 2 * d * int(m.mlp_ratio * d)
    moe = 2 * n * d * f.num_experts + n * _ffn_pairs_per_token(f) * mlp
    ffn = sum(moe if f.kind != "dense" and dit.is_moe_layer(i, f) else n * mlp for i in range(m.depth))
    blocks = m.depth * attn + ffn
  else:
    per_block = (attn + 2 * n * d * f.num_experts + n * _ffn_pairs_per_token(f) * swiglu(int(m.mlp_ratio * d))
                 + n * swiglu(f.num_shared_experts * d))
    blocks = m.depth * per_block
  out_channels = m.in_channels * (2 if m.class_cond.learn_sigma else 1)
  total = 2 * n * patch_dim * d + 2 * (256 * d + d * d) + blocks
  return int(total + 2 * d * 2 * d + 2 * n * d * m.patch_size ** 2 * out_channels)


def flops_per_image(m) -> int:
  """Forward FLOPs of one denoising step for one image (see module docstring)."""
  if _is_class_conditional(m):
    return class_cond_flops_per_image(m)
  d, f = m.hidden_size, m.ffn
  n = (m.input_size // m.patch_size) ** 2
  length = m.context_len
  patch_dim = m.patch_size ** 2 * m.in_channels
  total = 2 * n * patch_dim * d                       # patch embedding
  total += 2 * (256 * d + d * d)                      # timestep MLP
  total += 2 * length * (m.context_dim * d + d * d)   # caption projection
  single = m.get("conditioning", "adaln_zero") == "adaln_single"
  total += 2 * d * 6 * d if single else 0                           # adaLN-single's t_block, once
  for i in range(m.depth):
    total += 0 if single else 2 * d * 6 * d                         # adaLN
    total += 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d  # self-attention
    total += 2 * n * d * d + 2 * length * d * 2 * d + 2 * 2 * n * length * d + 2 * n * d * d  # cross
    hidden = int(m.mlp_ratio * d)
    mlp = 2 * 2 * d * hidden * (1.5 if f.activation == "swiglu" else 1.0)  # per token, one MLP
    if not dit.is_moe_layer(i, f):
      total += n * mlp
    elif f.kind == "dense":
      total += n * mlp * f.dense_mlp_ratio / m.mlp_ratio
    else:
      total += 2 * n * d * f.num_experts                            # router
      total += n * _ffn_pairs_per_token(f) * mlp
      if f.kind == "token_choice":
        total += n * f.num_shared_experts * mlp
  if m.long_skips:
    total += dit.num_long_skips(m.depth) * 2 * n * 2 * d * d         # U-ViT skip projections
  out_dim = patch_dim * (2 if m.get("learn_sigma", False) else 1)
  total += (0 if single else 2 * d * 2 * d) + 2 * n * d * out_dim   # final layer
  return int(total)


def summarize(model_config) -> dict[str, Any]:
  """Parameter counts and FLOPs of the configured DiT, from shapes only."""
  model = abstract_dit(model_config)
  rows = param_table(model)
  total = sum(math.prod(shape) for _, shape, _ in rows)
  expert = sum(math.prod(shape) for path, shape, _ in rows if "/experts/" in path)
  class_cond = _is_class_conditional(model_config)
  dit_style = class_cond and model_config.class_cond.get("ffn_style", "dit_moe") == "dit"
  moe_layers = model_config.depth if class_cond and not dit_style else sum(
      dit.is_moe_layer(i, model_config.ffn) for i in range(model_config.depth))
  f = model_config.ffn
  if f.kind == "dense" or moe_layers == 0:
    activated = total
  else:
    one_expert_all_layers = expert / f.num_experts
    activated = total - expert + _ffn_pairs_per_token(f) * one_expert_all_layers
  extra = {}
  if class_cond:
    extra["reference_params"] = int(total + model_config.hidden_size * (
        model_config.input_size // model_config.patch_size) ** 2)
  return {
      **extra,
      "total_params": int(total),
      "expert_params": int(expert),
      "num_moe_layers": int(moe_layers),
      "num_experts": int(f.num_experts) if f.kind != "dense" else 0,
      "ffn_kind": f.kind,
      "activated_params_per_token": int(round(activated)),
      "flops_per_image": flops_per_image(model_config),
      "tokens_per_image": (model_config.input_size // model_config.patch_size) ** 2,
  }


def _human(n: float) -> str:
  for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(n) >= scale:
      return f"{n / scale:.2f}{unit}"
  return str(n)


def format_table(model_config, stats: dict[str, Any]) -> str:
  """A human-readable table: parameters by component, then the totals."""
  model = abstract_dit(model_config)
  groups: dict[str, int] = {}
  for path, shape, _ in param_table(model):
    parts = path.split("/")
    if parts[0] == "blocks":
      key = "blocks/*/" + ("ffn/experts" if "experts" in parts else parts[2])
    else:
      key = parts[0]
    groups[key] = groups.get(key, 0) + math.prod(shape)
  width = max(len(k) for k in groups) + 2
  lines = [f"{'component':<{width}}{'params':>12}", "-" * (width + 12)]
  lines += [f"{k:<{width}}{_human(v):>12}" for k, v in sorted(groups.items())]
  lines.append("-" * (width + 12))
  keys = ("total_params", "expert_params", "activated_params_per_token", "flops_per_image")
  for key in (("reference_params",) if "reference_params" in stats else ()) + keys:
    lines.append(f"{key:<{width}}{_human(stats[key]):>12}")
  lines.append(f"{'num_moe_layers':<{width}}{stats['num_moe_layers']:>12}")
  return "\n".join(lines)


def print_summary(config) -> dict[str, Any]:
  """Prints the table, then one JSON line (last, for scripts); returns the stats."""
  stats = summarize(config.model)
  print(format_table(config.model, stats))
  print(json.dumps(stats), flush=True)
  return stats
