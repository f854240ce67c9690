"""What `python -m ec_dit.prepare` costs on this machine: images/s and bytes per example, real shapes.

Random weights in the paper's shapes: the SD VAE (sd-vae-ft-ema: 128-256-512-512,
2 layers per block) at 256x256 and T5-v1.1-XXL's width (d_model 4096, d_ff 10240,
64 heads) at 120 tokens. T5-XXL's 24 layers (19 GB in float32) do not fit beside
everything else in this machine's memory, so `--t5_layers` of them (default 2)
are timed and the encoder's time is scaled to 24 layers (the embedding and final
norm are negligible next to a layer): say so when quoting the figure. Each
encoder runs through `FrozenEncoders`, the class prepare uses, so padding,
chunking and jit are as in a real run. Prints JSON lines.

  python experiments/benchmark_prepare.py              # about 5 minutes on 2 CPU cores
  python experiments/benchmark_prepare.py --quick      # 1 T5 layer, batch 2
"""

import argparse
import dataclasses
import json
import statistics
import time

import numpy as np
from flax import nnx

from ec_dit.data import latents
from ec_dit.encoders import T5Config, T5Encoder
from ec_dit.encoders.frozen import FrozenEncoders
from ec_dit.encoders.vae import AutoencoderKL, VAEConfig

SD_VAE = VAEConfig(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                   norm_num_groups=32, scaling_factor=0.18215)
XXL_LAYERS = 24


class FixedLengthTokenizer:
  """Stands in for T5's tokenizer: every prompt is `n` tokens (EOS included)."""

  def __init__(self, n: int, context_len: int):
    self.n, self.context_len = n, context_len

  def pieces(self, prompt):
    return [5] * (self.n - 1)

  def __call__(self, prompts):
    ids = np.zeros((len(prompts), self.context_len), np.int32)
    ids[:, :self.n] = 5
    return ids, ids > 0


def timed(fn, rounds):
  fn()  # compile
  times = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--t5_layers", type=int, default=2)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--rounds", type=int, default=3)
  args = ap.parse_args()
  layers, batch, rounds = (1, 2, 1) if args.quick else (args.t5_layers, args.batch, args.rounds)
  t5_config = dataclasses.replace(T5Config.v1_1("xxl"), num_layers=layers)
  enc = FrozenEncoders(T5Encoder(t5_config, rngs=nnx.Rngs(0)), FixedLengthTokenizer(120, 120),
                       AutoencoderKL(SD_VAE, rngs=nnx.Rngs(1)), context_len=120, batch_size=batch)
  images = np.random.default_rng(0).integers(0, 256, (batch, 256, 256, 3), dtype=np.uint8)
  vae_s = timed(lambda: enc.latent_stats(images), rounds) / batch
  t5_s = timed(lambda: enc.text_features(["x"] * batch), rounds) / batch * XXL_LAYERS / layers
  print(json.dumps({"what": "vae_encode_256", "seconds_per_image": round(vae_s, 3), "batch": batch}), flush=True)
  print(json.dumps({"what": "t5_xxl_120_tokens", "seconds_per_prompt": round(t5_s, 3), "timed_layers": layers,
                    "scaled_to_layers": XXL_LAYERS, "batch": batch}), flush=True)
  print(json.dumps({"what": "prepare_throughput", "images_per_second": round(1.0 / (vae_s + t5_s), 4),
                    "note": f"T5-XXL scaled from {layers} layer(s); float32; this CPU"}), flush=True)
  mean, std = enc.latent_stats(images[:1])
  for n in (20, 120):  # a typical caption, and the longest
    record = latents.encode_record({"latent_mean": mean[0].astype(latents.BF16),
                                    "latent_std": std[0].astype(latents.BF16),
                                    "features": np.zeros((n, 4096), latents.BF16)},
                                   caption="x" * 100, label=-1, index=0, text_len=n, truncated=False)
    print(json.dumps({"what": "bytes_per_example", "text_tokens": n, "bytes": len(record)}), flush=True)


if __name__ == "__main__":
  main()
