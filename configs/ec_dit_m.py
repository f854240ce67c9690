"""EC-DiT-M: hidden 3072, depth 38, 48 heads, 64 experts (expert choice, capacity factor 2).

Usage: python -m ec_dit.main --config=configs/ec_dit_m.py --workdir=...
Variants (`configs/ec_dit_m.py:VARIANT`): see `ec_dit.schema.apply_variant`.
"""

from ec_dit import schema


def get_config(arg=None):
  config = schema.base_config()
  config.model = schema.paper_model(hidden_size=3072, depth=38, num_heads=48, num_experts=64)
  return schema.apply_variant(config, arg)
