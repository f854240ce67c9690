"""EC-DiT-3XL: hidden 2304, depth 42, 36 heads, 32 experts (expert choice, capacity factor 2).

Usage: python -m ec_dit.main --config=configs/ec_dit_3xl.py --workdir=...
Variants (`configs/ec_dit_3xl.py:VARIANT`): see `ec_dit.schema.apply_variant`.
"""

from ec_dit import schema


def get_config(arg=None):
  config = schema.base_config()
  config.model = schema.paper_model(hidden_size=2304, depth=42, num_heads=36, num_experts=32)
  return schema.apply_variant(config, arg)
