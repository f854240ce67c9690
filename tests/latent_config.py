"""A tiny latent EC-DiT for tests: `--config=tests/latent_config.py`.

16x16 RGB images, a VAE with one downsampling (8x8x4 latents), T5 features of
width 32 and at most 16 tokens; the tests write the random T5 and VAE checkpoints
(tests/latent_fixtures.py) and set the paths.
"""

from ec_dit import schema


def get_config(arg=None):
  config = schema.base_config()
  m = config.model
  m.input_size, m.in_channels, m.patch_size = 8, 4, 2
  m.hidden_size, m.depth, m.num_heads = 32, 2, 2
  m.context_dim, m.context_len = 32, 16
  m.ffn.num_experts, m.ffn.dispatch = 4, "gather"
  config.text.encoder = "t5"
  config.input.source = "latents:"
  config.input.image_size = 16
  config.input.read_threads = 0
  config.encoders.batch_size = 8
  config.batch_size = 4
  config.num_train_steps = 20
  config.warmup_steps = 2
  config.learning_rate = 1e-3
  config.log_every_steps = 1
  config.checkpoint_every_steps = 10
  config.eval_every_steps = 0
  config.sample.num_steps = 2
  config.sample.guidance_scale = 2.0
  config.sample.prompts = ("a red square",)
  config.geneval.domain, config.geneval.prompt_seed = "coco", 43
  return schema.apply_variant(config, arg)
