"""The text-to-image task (`config.model.arch = "ec_dit"`): EC-DiT (or dense PixArt-alpha) with a text encoder.

Examples carry captions: token ids for the trainable encoder, or T5 features from
prepared latents (`config.text.encoder = "t5"`). The loss is rectified flow
(`ec_dit.diffusion`), or DDPM for `model.prediction = "epsilon"` (PixArt-alpha,
`ec_dit.diffusion.text_ddpm`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ec_dit import diffusion, schema
from ec_dit.diffusion import text_ddpm
from ec_dit.model import text_to_image
from ec_dit.tasks.base import TEXT, Task, draw_latents


class TextToImageTask(Task):
  """Prompts in, images out: `ec_dit.model.TextToImage`."""

  arch = "ec_dit"
  conditioning = TEXT
  ffn_blocks = (("dit", "blocks"), "ffn")
  needs_text_encoder = True

  def validate(self, config):
    if config.text.encoder == "trainable" and schema.parse_source(config.input.source)[0] == "latents":
      schema.fail("text.encoder", "'t5' for a 'latents:DIR' source (its examples hold T5 features, not captions)",
                  config.text.encoder)

  def build_model(self, config, *, seed=None):
    return text_to_image.TextToImage(config, rngs=nnx.Rngs(config.seed if seed is None else seed))

  def abstract_model(self, config, *, seed=0):
    return text_to_image.abstract_model(config, seed=seed)

  def abstract_denoiser(self, config):
    return self.abstract_model(config).dit

  def abstract_batch(self, config, batch_sharding):
    """Pixels and token ids, or prepared latents (posterior statistics) and T5 features (`text.encoder="t5"`)."""
    m, b = config.model, config.batch_size
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
    latent = (b, m.input_size, m.input_size, m.in_channels)
    if config.text.encoder == "t5":
      return {"latent_mean": sds(latent, jnp.float32), "latent_std": sds(latent, jnp.float32),
              "features": sds((b, m.context_len, m.context_dim), jnp.float32),
              "mask": sds((b, m.context_len), jnp.bool_), "label": sds((b,), jnp.int32)}
    return {"image": sds(latent, jnp.float32), "tokens": sds((b, m.context_len), jnp.int32),
            "mask": sds((b, m.context_len), jnp.bool_)}

  def model_inputs(self, config, batch, key):
    """{"image", "text", "mask"}: pixels and token ids, or for prepared latents a fresh draw and the T5 features."""
    return {"image": draw_latents(batch, key), "text": batch["features" if "latent_mean" in batch else "tokens"],
            "mask": batch["mask"]}

  def loss(self, config, model, inputs, key):
    d = config.diffusion
    if config.model.prediction == "epsilon":  # DDPM (PixArt-alpha): ec_dit.diffusion.text_ddpm
      return text_ddpm.loss(model, inputs["image"], inputs["text"], inputs["mask"], key, uncond_prob=d.uncond_prob)
    return diffusion.rectified_flow_loss(model, inputs["image"], inputs["text"], inputs["mask"], key,
                                         t_mean=d.t_mean, t_std=d.t_std, uncond_prob=d.uncond_prob,
                                         loss_t_min=d.loss_t_min)

  def null_conditioning(self, config):
    return ""  # the empty prompt (all-False mask): the unconditional velocity guidance pushes away from

  def sample(self, config, model, conditioning, keys, *, image_shape, num_steps, guidance_scale,
             guidance_parallel, sampler):
    """`conditioning` = (tokens or T5 features, mask, None or DDPM's (null features, null mask))."""
    tokens, mask, null = conditioning
    if config.model.prediction == "epsilon":  # DDPM / DDIM (PixArt-alpha): ec_dit.diffusion.text_ddpm
      return text_ddpm.sample(model, tokens, mask, keys, image_shape=image_shape, num_steps=num_steps,
                              guidance_scale=guidance_scale, sampler=sampler,
                              null_context=None if null is None else null[0],
                              null_mask=None if null is None else null[1])
    return diffusion.sample(model, tokens, mask, keys, image_shape=image_shape, num_steps=num_steps,
                            guidance_scale=guidance_scale, guidance_parallel=guidance_parallel, sampler=sampler)

  def decode(self, config, samples, decoder=None):
    """Pixels in [-1, 1] -> uint8, or latents (`text.encoder="t5"`) through the VAE."""
    return diffusion.to_uint8(samples) if decoder is None else decoder.decode(np.asarray(samples))

  def heldout_keys(self, examples):
    return ("image", "features" if "features" in examples else "tokens", "mask")

  def heldout_loss(self, config):
    """Rectified flow's weighted velocity MSE at t, or for DDPM (PixArt-alpha) MSE + VB at round(t (T-1))."""
    ddpm = text_ddpm.diffusion(config.model.learn_sigma) if config.model.prediction == "epsilon" else None

    def one_t(model, batch, noise, t):
      x0 = batch["image"]
      b, axes = x0.shape[0], tuple(range(1, x0.ndim))
      tb = jnp.full((b,), t, jnp.float32)
      text = batch["features"] if "features" in batch else batch["tokens"]
      if ddpm is not None:
        steps = jnp.full((b,), int(round(t * (ddpm.num_timesteps - 1))), jnp.int32)
        terms, _ = ddpm.training_losses(lambda x, s: model(x, s, text, batch["mask"]), x0, steps, noise)
        return terms["loss"]
      v, _ = model(diffusion.interpolate(x0, noise, tb), tb, text, batch["mask"])
      return diffusion.loss_weight(tb, config.diffusion.loss_t_min) * jnp.mean(jnp.square(v - (noise - x0)), axes)

    return one_t
