"""DiT (Peebles & Xie 2023, facebookresearch/DiT) as the class-conditional model with DiT's dense GELU FFN.

    --config=configs/dit.py:XL-2-256   DiT-XL/2 at 256 px (32x32x4 latents): DiT-XL-2-256x256.pt (the default)
    --config=configs/dit.py:XL-2-512   DiT-XL/2 at 512 px: DiT-XL-2-512x512.pt
    also S-2, B-2, L-2 at 256 or 512 (e.g. B-2-256)

`python -m ec_dit.convert dit --checkpoint DiT-XL-2-256x256.pt --out RUN` writes a run with this config;
continue training it with `--config=configs/dit.py:XL-2-256 --workdir=RUN`, or upcycle it
(`python -m ec_dit.upcycle RUN --out RUN2 --experts 8`, docs/pixart.md).
"""

from ec_dit.convert import dit

SIZES = {"S-2": (384, 12, 6), "B-2": (768, 12, 12), "L-2": (1024, 24, 16), "XL-2": (1152, 28, 16)}  # d, depth, heads


def get_config(variant=None):
  name, _, res = (variant or "XL-2-256").rpartition("-")
  if name not in SIZES or res not in ("256", "512"):
    raise ValueError(f"configs/dit.py variant must be SIZE-RES with SIZE in {sorted(SIZES)} and RES 256 or 512, "
                     f"got {variant!r}")
  d, depth, heads = SIZES[name]
  return dit.base_config(hidden=d, depth=depth, heads=heads, input_size=int(res) // 8, patch=2, in_channels=4,
                         num_classes=1000, learn_sigma=True, mlp_ratio=4.0)
