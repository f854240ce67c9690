"""PixArt-alpha XL/2 (arXiv 2310.00426) as options of the text-to-image DiT; variants 256, 512, 1024 (px).

    python -m ec_dit.main --config=configs/pixart_alpha.py:512 --mode=summary
    python -m ec_dit.convert pixart --checkpoint PixArt-XL-2-512x512/transformer --out RUN   # the released weights

Dense (no MoE): start from the released weights, then upcycle (`--upcycle_experts`, docs/pixart.md).
"""

from ec_dit import schema


def get_config(arg=None):
  return schema.pixart_alpha_config(int(arg or 256))
