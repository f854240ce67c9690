"""Tiny EC-DiT that trains on a laptop CPU: 32x32 RGB ShapesWorld pixels, patch 4 (64 tokens).

The embedded default: `python -m ec_dit.main --config=configs/ec_dit_tiny.py --workdir=runs/tiny`
trains on 2 CPU cores, then scores the ShapesWorld GenEval-style set (README: scores, run time).
Why each field has its value, with the runs and commands behind it: docs/tiny_recipe.md.

Variants at matched activated compute:
  configs/ec_dit_tiny.py        expert choice, capacity factor 2 (default)
  configs/ec_dit_tiny.py:tc     token choice top-2
  configs/ec_dit_tiny.py:dense  dense FFN of width 2 x 4d at the MoE positions
  configs/ec_dit_tiny.py:ec_batch  expert choice, one routing group over the whole batch
  configs/ec_dit_tiny.py:tc_cap2   token choice top-2, capacity factor 2 (drops overflowing tokens)
"""

from ec_dit import schema


def get_config(arg=None):
  config = schema.base_config()
  m = config.model
  # Pixels at patch 4: patch 2 makes each step far slower, patch 8 learned no colours in the sweep.
  m.input_size, m.in_channels, m.patch_size = 32, 3, 4
  # Trading this width, depth or head count for more steps (or steps for width) did no better.
  m.hidden_size, m.depth, m.num_heads = 128, 6, 4
  # Every ShapesWorld prompt fits in 12 tokens (a test checks it); a longer context slows each step.
  m.context_dim, m.context_len = 128, 12
  # A tiny model learns the prompt far faster when it also modulates every block.
  m.pooled_text_conditioning = True
  # The network predicts the clean image (JiT), which learns shapes in pixel space far faster.
  m.prediction = "x0"
  # Eight experts at capacity factor 2 give each expert 16 of an image's 64 tokens.
  m.ffn.num_experts = 8
  m.ffn.dispatch = "gather"  # faster than the one-hot einsum on CPUs (experiments/benchmark_moe.py)
  # A small text encoder for captions of at most ten words.
  config.text.depth, config.text.num_heads = 2, 4

  # Images are made at the model's input size.
  config.input.image_size = 32
  # Captions from the six GenEval templates only: descriptive ones need a longer context and did not help.
  config.input.shapes_world_tasks = schema.TASKS
  config.batch_size = 32
  # Batch: smaller ones for more steps, or larger for fewer, did no better in the same time.
  # Steps: as many as fit the CPU time budget, since steps are what this model lacks.
  config.num_train_steps = 4350
  # The best of the learning rates tried; a higher one with Muon was no better on average.
  config.learning_rate = 1e-3
  # Muon on the attention, adaLN and dense-FFN matrices (AdamW on the rest) learns faster per step.
  config.optimizer = "muon"
  # Three Newton-Schulz steps gained as much per step as five, at a lower cost.
  config.muon.ns_steps = 3
  # Experts stay on AdamW: Muon on them cost much more per step for a similar gain.
  config.muon.experts = False
  # A short warmup for a short run.
  config.warmup_steps = 100
  # A second-moment average that follows a run of a few thousand steps.
  config.adam_b2 = 0.99
  # Samples use EMA weights; a faster decay (0.99) was no better in the sweep.
  config.ema_decay = 0.999
  # A loss curve fine enough to read, at little cost to the loop.
  config.log_every_steps = 50
  # A preempted or killed run loses at most this many steps.
  config.checkpoint_every_steps = 500
  # Sample grids at a third, two thirds and the end of the run.
  config.eval_every_steps = 1450

  # The x0 network's velocity loss weights a nearly clean example up to 400x a noisy one; the cap
  # gives the high-noise steps, where shapes and layout are decided, their share.
  config.diffusion.loss_t_min = 0.3

  # Euler 32 steps: 64 steps or Heun were no better.
  config.sample.num_steps = 32
  # Guidance 3: both 2 and 4.5 scored lower.
  config.sample.guidance_scale = 3.0
  # Projected guidance (diffusion.guide): plain CFG erased the object of one-object prompts.
  config.sample.guidance_parallel = 0.0
  # At most 100 prompts per task: the whole de-duplicated ShapesWorld set.
  config.geneval.per_task = 100
  # Four images per prompt, as GenEval.
  config.geneval.images_per_prompt = 4
  return schema.apply_variant(config, arg)
