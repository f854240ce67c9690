"""EC-DiT-3XL: hidden 2304, depth 42, 36 heads, 32 experts (expert choice, capacity factor 2).

Trains on prepared SD-VAE latents and T5-XXL features (README: "Train EC-DiT on your own data"):
  python -m ec_dit.prepare --config=configs/ec_dit_3xl.py --source=folder:IMAGES --out=DATA \\
      --config.encoders.t5_path=T5 --config.encoders.vae_path=VAE
  python -m ec_dit.main --config=configs/ec_dit_3xl.py --workdir=RUN --config.input.source=latents:DATA \\
      --config.encoders.t5_path=T5 --config.encoders.vae_path=VAE
Variants (`configs/ec_dit_3xl.py:VARIANT`): see `ec_dit.schema.apply_variant`.
"""

from ec_dit import schema


def get_config(arg=None):
  config = schema.paper_config(hidden_size=2304, depth=42, num_heads=36, num_experts=32)
  return schema.apply_variant(config, arg)
