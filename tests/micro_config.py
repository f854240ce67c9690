"""The tests' base config: the CLI reads it as `--config=tests/micro_config.py[:VARIANT]`.

A copy of the tiny recipe's values, fixed here so that retuning `configs/ec_dit_tiny.py`
cannot change what the tests see. `tests/helpers.py` shrinks it further.
"""

from ec_dit import schema


def get_config(variant=None):
  """A small pixel-space EC-DiT recipe (32x32x3, patch 4, width 128, 6 layers, 8 experts), fixed for tests."""
  config = schema.base_config()
  m = config.model
  m.input_size, m.in_channels, m.patch_size = 32, 3, 4
  m.hidden_size, m.depth, m.num_heads = 128, 6, 4
  m.context_dim, m.context_len = 128, 12
  m.pooled_text_conditioning = True
  m.prediction = "x0"
  m.ffn.num_experts = 8
  m.ffn.dispatch = "gather"
  config.text.depth, config.text.num_heads = 2, 4
  config.input.image_size = 32
  config.input.shapes_world_tasks = schema.TASKS
  config.batch_size = 32
  config.num_train_steps = 4350
  config.learning_rate = 1e-3
  config.optimizer = "muon"
  config.muon.ns_steps = 3
  config.muon.experts = False
  config.warmup_steps = 100
  config.adam_b2 = 0.99
  config.ema_decay = 0.999
  config.log_every_steps = 50
  config.checkpoint_every_steps = 500
  config.eval_every_steps = 1450
  config.diffusion.loss_t_min = 0.3
  config.sample.num_steps = 32
  config.sample.guidance_scale = 3.0
  config.sample.guidance_parallel = 0.0
  config.geneval.per_task = 100
  config.geneval.images_per_prompt = 4
  return schema.apply_variant(config, variant)
