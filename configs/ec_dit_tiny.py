"""Tiny EC-DiT that trains on a laptop CPU: 32x32 RGB pixels, patch 2 (256 tokens).

The embedded default. Variants at matched activated compute:
  configs/ec_dit_tiny.py        expert choice, capacity factor 2 (default)
  configs/ec_dit_tiny.py:tc     token choice top-2
  configs/ec_dit_tiny.py:dense  dense FFN of width 2 x 4d at the MoE positions
"""

from ec_dit import config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  m = config.model
  m.input_size, m.in_channels, m.patch_size = 32, 3, 2
  m.hidden_size, m.depth, m.num_heads = 128, 6, 4
  m.context_dim, m.context_len = 128, 16
  m.ffn.num_experts = 8
  m.ffn.dispatch = "gather"  # faster than the one-hot einsum on CPUs (experiments/benchmark_moe.py)
  return config_lib.apply_variant(config, arg)
