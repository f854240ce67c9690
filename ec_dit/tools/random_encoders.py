"""Random T5 and VAE checkpoints in the real Hugging Face layout, to try the latent path without downloads.

    python -m ec_dit.tools.random_encoders --out DIR      # DIR/t5 and DIR/vae

`DIR/t5` is a transformers T5 encoder folder (`config.json`, `model.safetensors`, `spiece.model`) and
`DIR/vae` a diffusers AutoencoderKL folder (`config.json`, `diffusion_pytorch_model.safetensors`): the
files and tensor names `T5Encoder.from_pretrained` / `AutoencoderKL.from_pretrained` read from the real
`google/t5-v1_1-xxl` and `stabilityai/sd-vae-ft-ema`, at random initialisation and small sizes. The
default sizes fit `configs/ec_dit_latent_demo.py` (features 64 wide; 64x64 images -> 8x8x4 latents,
the SD VAE's 8x downsampling). Their features and decoded images carry no meaning: they exercise the
pipeline (prepare, train, sample, evaluate), not the quality. The tests' encoder fixtures come from
the same functions (tests/latent_fixtures.py).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import tempfile

import numpy as np
import sentencepiece
from flax import nnx
from safetensors.numpy import save_file

from ec_dit.encoders import t5 as t5_lib, vae as vae_lib

T5_CONFIG = {"model_type": "t5", "architectures": ["T5EncoderModel"], "vocab_size": 256, "d_model": 64, "d_kv": 16,
             "d_ff": 128, "num_layers": 2, "num_heads": 4, "relative_attention_num_buckets": 8,
             "relative_attention_max_distance": 16, "layer_norm_epsilon": 1e-6, "feed_forward_proj": "gated-gelu",
             "eos_token_id": 1, "pad_token_id": 0}
VAE_CONFIG = {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [8, 16, 16, 16],
              "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
              "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
              "norm_num_groups": 4, "scaling_factor": 0.18215, "shift_factor": None, "use_quant_conv": True,
              "use_post_quant_conv": True, "mid_block_add_attention": True}
# Captions the demo tokenizer is trained on: ShapesWorld's and GenEval's words.
_WORDS = ("a an the photo of red green blue yellow purple orange pink brown black white gray circle circles square "
          "squares triangle triangles cat dog car bench cup apple one two three four left right above below next "
          "to and on in with").split()


def _random_tensors(abstract: nnx.Module, sources: dict, seed: int) -> dict[str, np.ndarray]:
  """Random parameters for the shapes of `abstract` (from `nnx.eval_shape`), under the checkpoint names and
  layouts its `from_pretrained` reads: matrices N(0, 1 / fan_in), norm scales 1, biases 0. Drawn with numpy,
  so no per-shape JAX program is compiled (seconds, not a minute, for the demo VAE)."""
  rng = np.random.default_rng(seed)
  tensors = {}
  for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    name = ".".join(str(p) for p in path)
    shape = tuple(var.get_value().shape)
    if len(shape) >= 2:
      x = rng.standard_normal(shape, np.float32) / np.sqrt(np.prod(shape[:-1]))
    else:
      x = np.ones(shape, np.float32) if path[-1] == "scale" else np.zeros(shape, np.float32)
    src = sources[name]
    tensors[src.names[0]] = np.ascontiguousarray(x if src.perm is None else x.transpose(np.argsort(src.perm)))
  return tensors


def _write(tensors: dict, folder: pathlib.Path, file: str, config: dict) -> None:
  folder.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(folder / file))
  (folder / "config.json").write_text(json.dumps(config, indent=2))


def train_tokenizer(path: pathlib.Path, vocab_size: int, seed: int = 0) -> pathlib.Path:
  """A T5-style sentencepiece unigram model (pad 0, EOS 1, unk 2) trained on random ShapesWorld-like captions."""
  rng = np.random.default_rng(seed)
  sentences = [" ".join(rng.choice(_WORDS, rng.integers(3, 10))) for _ in range(3000)]
  with tempfile.TemporaryDirectory() as tmp:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=os.path.join(tmp, "spiece"), vocab_size=vocab_size,
        model_type="unigram", minloglevel=2, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
        byte_fallback=False, num_threads=1, hard_vocab_limit=False)
    shutil.copy(os.path.join(tmp, "spiece.model"), path)
  return path


def write_t5(folder, *, config: dict | None = None, seed: int = 0, tokenizer=None) -> pathlib.Path:
  """A random T5 encoder folder: `config.json`, `model.safetensors`, `spiece.model` (`tokenizer`, a
  sentencepiece file to copy, or one trained here with the config's vocabulary size)."""
  folder, config = pathlib.Path(folder), dict(config or T5_CONFIG)
  c = t5_lib.T5Config.from_dict(config)
  abstract = nnx.eval_shape(lambda: t5_lib.T5Encoder(c, rngs=nnx.Rngs(0)))
  _write(_random_tensors(abstract, t5_lib.checkpoint_sources(c), seed), folder, "model.safetensors", config)
  if tokenizer is not None:
    shutil.copy(tokenizer, folder / "spiece.model")
  else:
    train_tokenizer(folder / "spiece.model", config["vocab_size"], seed)
  return folder


def write_vae(folder, *, config: dict | None = None, seed: int = 0) -> pathlib.Path:
  """A random AutoencoderKL folder: `config.json`, `diffusion_pytorch_model.safetensors`."""
  folder, config = pathlib.Path(folder), dict(config or VAE_CONFIG)
  c = vae_lib.VAEConfig.from_dict(config)
  abstract = nnx.eval_shape(lambda: vae_lib.AutoencoderKL(c, rngs=nnx.Rngs(0)))
  _write(_random_tensors(abstract, vae_lib.checkpoint_sources(abstract), seed), folder,
         "diffusion_pytorch_model.safetensors", config)
  return folder


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m ec_dit.tools.random_encoders", description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="folder to write t5/ and vae/ into")
  parser.add_argument("--seed", type=int, default=0, help="initialisation seed")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  t5, vae = write_t5(out / "t5", seed=args.seed), write_vae(out / "vae", seed=args.seed)
  print(f"wrote a random T5 encoder (width {T5_CONFIG['d_model']}) to {t5} and a random VAE "
        f"({2 ** (len(VAE_CONFIG['block_out_channels']) - 1)}x downsampling, {VAE_CONFIG['latent_channels']} "
        f"latent channels) to {vae}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
