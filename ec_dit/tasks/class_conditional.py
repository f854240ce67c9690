"""The class-conditional task (`config.model.arch = "dit_moe"`): DiT-MoE's network and losses.

It trains on prepared latents with class labels (`config.input.source = "latents:DIR"`
of an ImageNet-style folder of class subfolders; docs/dit_moe.md), by
`config.class_diffusion.objective` (`ec_dit.diffusion.class_labels`: DDPM or rectified flow).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ec_dit import schema
from ec_dit.diffusion import class_labels as class_diffusion
from ec_dit.model import dit_moe
from ec_dit.tasks.base import CLASS_LABEL, Task, draw_latents

# The prepared-latent fields the class-conditional step reads (the T5 features and mask are not used).
BATCH_KEYS = ("latent_mean", "latent_std", "label")


class ClassConditionalTask(Task):
  """Class labels in, latents out: `ec_dit.model.dit_moe.DiTMoE`."""

  arch = "dit_moe"
  conditioning = CLASS_LABEL
  ffn_blocks = (("blocks",), "mlp")  # DiT's GELU MLP (class_cond.ffn_style="dit")
  needs_text_encoder = False
  model_sections = ("class_cond",)
  metric_keys = ("mse", "vb", "aux_loss")

  def validate(self, config):
    schema.validate_dit_moe_network(config)

  def build_model(self, config, *, seed=None):
    return dit_moe.build(config, seed=seed)

  def abstract_model(self, config, *, seed=0):
    return dit_moe.abstract_model(config, seed=seed)

  def check_upcyclable(self, config):
    if config.model.class_cond.ffn_style != "dit":
      raise ValueError("upcycling needs DiT's GELU FFN (config.model.class_cond.ffn_style='dit'); DiT-MoE runs "
                       "(SwiGLU experts) are MoEs already")

  def check_source(self, config):
    kind, _ = schema.parse_source(config.input.source)
    if kind != "latents":
      raise ValueError(f"config.input.source: model.arch='dit_moe' trains on prepared latents with class labels, "
                       f"'latents:DIR' (a folder written by `python -m ec_dit.prepare` from ImageNet-style class "
                       f"subfolders; docs/dit_moe.md), got {config.input.source!r}")

  def train_batch(self, config, local):
    """Only the latents and labels, checked: ValueError when a label is missing (-1: the folder was not
    prepared from class subfolders) or outside [0, config.model.class_cond.num_classes)."""
    labels = np.asarray(local["label"])
    n = config.model.class_cond.num_classes
    if (labels < 0).any():
      raise ValueError(f"config.input.source={config.input.source!r}: examples without a class label (-1); a "
                       f"class-conditional run needs data prepared from class subfolders (DIR/<class>/*.png)")
    if (labels >= n).any():
      raise ValueError(f"config.model.class_cond.num_classes={n}: the data has label {int(labels.max())}; labels "
                       f"must be in [0, {n})")
    return {k: local[k] for k in BATCH_KEYS}

  def abstract_batch(self, config, batch_sharding):
    """Prepared latents (posterior statistics) and class labels (`train_batch`'s fields)."""
    m, b = config.model, config.batch_size
    latent = jax.ShapeDtypeStruct((b, m.input_size, m.input_size, m.in_channels), jnp.float32,
                                  sharding=batch_sharding)
    return {"latent_mean": latent, "latent_std": latent,
            "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=batch_sharding)}

  def model_inputs(self, config, batch, key):
    return {"image": draw_latents(batch, key), "label": batch["label"]}

  def loss(self, config, model, inputs, key):
    return class_diffusion.loss(model, inputs, key, config)

  def null_conditioning(self, config):
    return config.model.class_cond.num_classes  # the null class

  def sample(self, config, model, conditioning, keys, *, image_shape, sampler, num_steps, guidance_scale):
    """`conditioning` = (labels [B] int32, initial noise x_T [B, *image_shape]); `keys` the sampler's."""
    labels, x_T = conditioning
    return class_diffusion.sample(model, labels, x_T, config, key=keys, sampler=sampler, num_steps=num_steps,
                                  guidance_scale=guidance_scale)

  def decode(self, config, samples, decoder=None):
    """Latents as float32, or through `decoder` (which divides by the VAE's scaling factor itself)."""
    return np.asarray(samples) if decoder is None else decoder.decode(np.asarray(samples))

  def heldout_keys(self, examples):
    return ("image", "label")

  def heldout_loss(self, config):
    """DDPM's MSE + VB at timestep round(t (T-1)), or rectified flow's MSE on eps - x0; labels always given."""
    ddpm = class_diffusion.make_diffusion(config) if config.class_diffusion.objective == "ddpm" else None

    def one_t(model, batch, noise, t):
      x0 = batch["image"]
      b, axes = x0.shape[0], tuple(range(1, x0.ndim))
      keep = jnp.zeros((b,), bool)  # labels always given
      if ddpm is not None:
        steps = jnp.full((b,), int(round(t * (ddpm.num_timesteps - 1))), jnp.int32)
        terms, _ = ddpm.training_losses(lambda x, s: model(x, s, batch["label"], drop_mask=keep), x0, steps, noise)
        return terms["loss"]
      tb = jnp.full((b,), t, jnp.float32)
      out, _ = model((1 - t) * x0 + t * noise, tb, batch["label"], drop_mask=keep)
      return jnp.mean(jnp.square(noise - x0 - out[..., :x0.shape[-1]]), axes)

    return one_t
