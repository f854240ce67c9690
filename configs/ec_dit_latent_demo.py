"""A CPU-sized latent EC-DiT with the paper's real pipeline: prepared VAE latents and T5 features.

For trying the latent path in minutes without the 11B T5-XXL: docs/latent_data.md walks through
random encoders (`python -m ec_dit.tools.random_encoders --out DIR`), prepare, train, sample and
evaluate with it. 64x64 images become 8x8x4 latents (a VAE with the SD VAE's 8x downsampling), T5
features are 64 wide (the random encoder's width); with real checkpoints change `context_dim` to
the T5's width and `input_size` to image_size / 8.
"""

from ec_dit import schema


def get_config(arg=None):
  config = schema.base_config()
  m = config.model
  # 64x64 images through an 8x VAE: 8x8x4 latents; patch 1 gives 64 tokens, as the tiny pixel model.
  m.input_size, m.in_channels, m.patch_size = 8, 4, 1
  # The tiny model's width and heads, four layers: a few steps per second on two CPU cores.
  m.hidden_size, m.depth, m.num_heads = 128, 4, 4
  # The random T5's width (tools/random_encoders.py); captions of up to 15 pieces plus EOS.
  m.context_dim, m.context_len = 64, 16
  # Eight experts at capacity factor 2: each takes 16 of an image's 64 tokens.
  m.ffn.num_experts, m.ffn.dispatch = 8, "gather"
  # Frozen T5 features instead of a trainable text encoder: the paper's path.
  config.text.encoder = "t5"
  config.input.source = "latents:"  # set to the folder `python -m ec_dit.prepare` wrote
  config.input.image_size = 64
  config.encoders.batch_size = 32
  config.batch_size = 16
  # Enough steps to see the loss fall and every output written, in a couple of minutes.
  config.num_train_steps = 300
  config.warmup_steps = 20
  config.learning_rate = 1e-3
  config.log_every_steps = 25
  config.checkpoint_every_steps = 100
  # One sample grid and routing map, at the end.
  config.eval_every_steps = 300
  config.sample.num_steps = 8
  config.sample.prompts = ("a photo of a red circle", "a photo of two blue squares")
  # A small ShapesWorld GenEval-style set, one image per prompt: the evaluate step in seconds.
  config.geneval.domain = "shapes"
  config.geneval.per_task = 2
  config.geneval.images_per_prompt = 1
  config.geneval.batch_size = 16
  return schema.apply_variant(config, arg)
