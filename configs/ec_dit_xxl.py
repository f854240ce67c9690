"""EC-DiT-XXL: hidden 1536, depth 38, 24 heads, 32 experts (expert choice, capacity factor 2).

Usage: python -m ec_dit.main --config=configs/ec_dit_xxl.py --workdir=...
Variants (`configs/ec_dit_xxl.py:VARIANT`): see `ec_dit.schema.apply_variant`.
"""

from ec_dit import schema


def get_config(arg=None):
  config = schema.base_config()
  config.model = schema.paper_model(hidden_size=1536, depth=38, num_heads=24, num_experts=32)
  return schema.apply_variant(config, arg)
