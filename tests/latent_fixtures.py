"""Writes small random T5 and VAE checkpoints in Hugging Face layout, and captioned image folders, for tests.

The checkpoints come from `ec_dit.tools.random_encoders` (the command a user runs for the latent demo)
at the tests' smaller sizes, with the tokenizer fixture.
"""

import pathlib

import numpy as np
from PIL import Image

from ec_dit.tools import random_encoders

FIXTURES = pathlib.Path(__file__).with_name("fixtures") / "encoders"

T5_CONFIG = {"model_type": "t5", "architectures": ["T5EncoderModel"], "vocab_size": 48, "d_model": 32, "d_kv": 8,
             "d_ff": 48, "num_layers": 2, "num_heads": 4, "relative_attention_num_buckets": 8,
             "relative_attention_max_distance": 12, "layer_norm_epsilon": 1e-6, "feed_forward_proj": "gated-gelu",
             "eos_token_id": 1, "pad_token_id": 0}
VAE_CONFIG = {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [8, 16],
              "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
              "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
              "norm_num_groups": 4, "scaling_factor": 0.18215, "shift_factor": None, "use_quant_conv": True,
              "use_post_quant_conv": True, "mid_block_add_attention": True}


def write_t5(folder: pathlib.Path, seed: int = 0) -> pathlib.Path:
  """A random 2-layer T5 encoder (width 32) with the fixture tokenizer (`python -m ec_dit.tools.random_encoders`)."""
  return random_encoders.write_t5(folder, config=T5_CONFIG, seed=seed,
                                  tokenizer=FIXTURES / "tokenizer" / "spiece.model")


def write_vae(folder: pathlib.Path, seed: int = 0) -> pathlib.Path:
  """A random AutoencoderKL with one downsampling: 16x16x3 images <-> 8x8x4 latents."""
  return random_encoders.write_vae(folder, config=VAE_CONFIG, seed=seed)


COLORS = {"red": (220, 40, 40), "green": (50, 160, 60), "blue": (40, 90, 220), "yellow": (240, 220, 40)}


def write_image_folder(folder: pathlib.Path, n: int = 64, *, corrupt=(5, 17), empty_caption=9,
                       size: int = 20) -> pathlib.Path:
  """n PNGs with a same-stem .txt caption each: a coloured square on grey; `corrupt` indices are broken
  files (a zero-byte one and a truncated PNG), `empty_caption` has an empty caption."""
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  names = list(COLORS)
  for i in range(n):
    color = names[i % len(names)]
    img = np.full((size, size + 4, 3), 128, np.uint8)
    x, y = rng.integers(0, size - 8, 2)
    img[y:y + 8, x:x + 8] = COLORS[color]
    path = folder / f"{i:03d}.png"
    Image.fromarray(img).save(path)
    if i == corrupt[0]:
      path.write_bytes(b"")
    elif i == corrupt[1]:
      path.write_bytes(path.read_bytes()[:40])
    (folder / f"{i:03d}.txt").write_text("" if i == empty_caption else f"a photo of a {color} square")
  return folder
