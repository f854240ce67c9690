"""Training and sampling speed of the tiny config for the three FFN kinds.

What is measured
  train: steps/s of the jitted train step (forward, backward, the config's optimizer, EMA) at the
    config's batch size, on batches prepared beforehand (the input pipeline is
    not in the timing). Images/s of training = steps/s x batch size.
  sample: images/s of `TextToImagePipeline.generate` with the config's sampler,
    steps and guidance (conditional and unconditional in one batch).
  Variants at matched activated compute: expert choice (ec), token choice top-2
  (tc), dense FFN of width 2 x 4d at the MoE positions (dense). All train with
  the tiny config's optimizer (Muon + AdamW); ec_adamw is ec with AdamW alone,
  to show what Muon costs per step.

How
  Each variant is compiled and warmed up first. Then `--rounds` rounds; in each
  round every variant runs `--steps` train steps and one sampling batch, in a
  rotated order, so machine noise hits all alike. Medians over rounds.

Usage
  python experiments/benchmark_train.py            # a few minutes
  python experiments/benchmark_train.py --quick

Output: a table, then one JSON line starting with {"benchmark": "train_tiny".
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import statistics
import time

import jax
import numpy as np

from ec_dit import data, tokenizer as tokenizer_lib
from ec_dit.inference import TextToImagePipeline
from ec_dit.training import optimizers, state as state_lib, step as step_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
VARIANTS = ("ec", "tc", "dense", "ec_adamw")


def load_config(variant):
  """The tiny config's variant (None or "ec": expert choice); "ec_adamw" trains it with AdamW alone."""
  spec = importlib.util.spec_from_file_location("tiny", REPO / "configs" / "ec_dit_tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(None if variant in ("ec", "ec_adamw") else variant)
  if variant == "ec_adamw":
    config.optimizer = "adamw"
  return config


class Runner:
  """One variant: its jitted step, state, prepared batches and a sampling pipeline."""

  def __init__(self, variant, num_batches, sample_batch):
    self.config = config = load_config(variant)
    tokenizer = tokenizer_lib.tokenizer_from_config(config)
    batches = iter(data.create_dataset(config.input, batch_size=config.batch_size,
                                       tokenize=tokenizer.encode, seed=0))
    self.batches = [next(batches) for _ in range(num_batches)]
    tx = optimizers.make_optimizer(config)
    graphdef, self.state, self.ema = state_lib.init_state(config, tx)
    self.step_fn = step_lib.make_train_step(config, graphdef, tx)
    self.pipe = TextToImagePipeline(config, jax.tree.map(np.asarray, self.ema), batch_size=sample_batch)
    self.prompts = list(config.sample.prompts) * (sample_batch // len(config.sample.prompts) + 1)
    self.prompts = self.prompts[:sample_batch]
    self.train_steps(1)  # compile + warm up
    self.sample()

  def train_steps(self, n):
    t = time.perf_counter()
    for i in range(n):
      self.state, self.ema, metrics = self.step_fn(self.state, self.ema, self.batches[i % len(self.batches)])
    jax.block_until_ready(metrics["loss"])
    return n / (time.perf_counter() - t)

  def sample(self):
    t = time.perf_counter()
    images = self.pipe.generate(self.prompts, seed=0)
    return len(images) / (time.perf_counter() - t)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--sample_batch", type=int, default=64)
  args = parser.parse_args()
  if args.quick:
    args.rounds, args.steps, args.sample_batch = 2, 5, 16
  runners = {v: Runner(v, 8, args.sample_batch) for v in VARIANTS}
  results = {v: {"train": [], "sample": []} for v in VARIANTS}
  for r in range(args.rounds):
    k = r % len(VARIANTS)
    order = VARIANTS[k:] + VARIANTS[:k]
    for v in order:
      results[v]["train"].append(runners[v].train_steps(args.steps))
      results[v]["sample"].append(runners[v].sample())
  rows = []
  print(f"{'variant':<8}{'steps/s':>10}{'train img/s':>13}{'sample img/s':>14}{'vs dense (train)':>18}")
  dense_steps = statistics.median(results["dense"]["train"])
  for v in VARIANTS:
    c = runners[v].config
    steps = statistics.median(results[v]["train"])
    sample = statistics.median(results[v]["sample"])
    rows.append({"variant": v, "batch_size": c.batch_size, "steps_per_sec": round(steps, 3),
                 "train_images_per_sec": round(steps * c.batch_size, 1), "sample_images_per_sec": round(sample, 2),
                 "sampler": c.sample.sampler, "sample_steps": c.sample.num_steps,
                 "guidance_scale": c.sample.guidance_scale, "guidance_parallel": c.sample.guidance_parallel,
                 "train_time_vs_dense": round(dense_steps / steps, 3)})
    print(f"{v:<8}{steps:>10.2f}{steps * c.batch_size:>13.1f}{sample:>14.2f}{dense_steps / steps:>17.2f}x")
  print(json.dumps({"benchmark": "train_tiny", "rounds": args.rounds, "steps_per_round": args.steps,
                    "variants": rows}))


if __name__ == "__main__":
  main()
