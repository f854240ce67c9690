"""Pretrained encoders loaded from local Hugging Face checkpoints: the T5 text encoder and the SD VAE.

  t5 = T5Encoder.from_pretrained(path)            # a transformers T5 folder
  tokenizer = T5Tokenizer.from_pretrained(path)   # spiece.model or tokenizer.json
  vae = AutoencoderKL.from_pretrained(path)       # a diffusers AutoencoderKL folder

See docs/encoders.md for which public checkpoints to place where.
"""

from ec_dit.encoders.hf_checkpoint import CheckpointError
from ec_dit.encoders.t5 import T5Config, T5Encoder
from ec_dit.encoders.t5_tokenizer import T5Tokenizer
from ec_dit.encoders.vae import AutoencoderKL, VAEConfig

__all__ = ["AutoencoderKL", "CheckpointError", "T5Config", "T5Encoder", "T5Tokenizer", "VAEConfig"]
