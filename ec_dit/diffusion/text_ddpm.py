"""DDPM training and DDPM/DDIM sampling of the text-to-image DiT with `model.prediction = "epsilon"` (PixArt-alpha).

The process is PixArt-alpha's (and DiT's): linear betas 1e-4..0.02 over 1000
steps (`ec_dit.diffusion.ddpm`), an epsilon-predicting network, with `model.learn_sigma`
a learned-range variance trained by the variational bound (IDDPM). The network
sees the original timestep 0..999 as diffusers passes it.

Sampling respaces to `num_steps` with diffusers' "leading" spacing where it
exists (0, 1000/n, 2*1000/n, ...: `ddpm.space_timesteps(1000, "ddimN")`), else
DiT's even spacing, and runs DDIM (eta 0) or the ancestral DDPM sampler.
Classifier-free guidance follows PixArtAlphaPipeline: conditional and
unconditional outputs in one batch, uncond + s (cond - uncond) on every output
channel. The unconditional text is `null_context` (e.g. T5 features of "", as
the pipeline encodes the negative prompt) or, by default, the prompt with an
all-False mask: the empty prompt this library trains with.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ec_dit import schema
from ec_dit.diffusion import ddpm
from ec_dit.model import dit as dit_lib


def diffusion(learn_sigma: bool, num_steps: int | None = None) -> ddpm.Diffusion:
  """The 1000-step process, or its respacing to `num_steps` (leading spacing when 1000 allows it)."""
  betas = ddpm.linear_betas(schema.DDPM_TIMESTEPS)
  if num_steps is None:
    return ddpm.Diffusion.create(betas, learn_sigma=learn_sigma)
  try:
    keep = ddpm.space_timesteps(schema.DDPM_TIMESTEPS, f"ddim{num_steps}")
  except ValueError:
    keep = ddpm.space_timesteps(schema.DDPM_TIMESTEPS, str(num_steps))
  return ddpm.Diffusion.create(betas, use_timesteps=keep, learn_sigma=learn_sigma)


def loss(model, images, tokens, mask, key, *, uncond_prob: float = 0.1):
  """DDPM loss (MSE on the noise, plus the VB term for a learned sigma) and the MoE auxiliary losses.

  `model` is a TextToImage; an example's text is dropped (all-False mask) with
  probability `uncond_prob`. Returns (loss, aux) as `diffusion.rectified_flow_loss`, with aux["mse"] the
  noise MSE and aux["vb"] the variational bound term (zero without learned sigma).
  """
  k_t, k_noise, k_drop = jax.random.split(key, 3)
  b = images.shape[0]
  proc = diffusion(model.dit.config.learn_sigma)
  t = jax.random.randint(k_t, (b,), 0, proc.num_timesteps)
  noise = jax.random.normal(k_noise, images.shape, images.dtype)
  keep = jax.random.uniform(k_drop, (b,)) >= uncond_prob
  mask = jnp.logical_and(mask, keep[:, None])
  terms, aux = proc.training_losses(lambda x, tt: model(x, tt, tokens, mask), images, t, noise)
  return jnp.mean(terms["loss"]) + aux["aux_loss"], {"mse": jnp.mean(terms["mse"]), "vb": jnp.mean(terms["vb"]), **aux}


def _guided(model, cache: dit_lib.ContextCache, null_cache: dit_lib.ContextCache | None, guidance_scale: float):
  """model_fn(x, t) -> the network output with PixArt's classifier-free guidance on every channel."""
  if guidance_scale == 1.0:
    return lambda x, t: model.dit(x, t, context_cache=cache)[0]
  if null_cache is None:
    null_cache = dit_lib.ContextCache(cache.kv, jnp.zeros_like(cache.mask),
                                      None if cache.pooled is None else jnp.zeros_like(cache.pooled))
  both = jax.tree.map(lambda u, c: jnp.concatenate([u, c]), null_cache, cache)

  def model_fn(x, t):
    out, _ = model.dit(jnp.concatenate([x, x]), jnp.concatenate([t, t]), context_cache=both)
    uncond, cond = jnp.split(out, 2)
    return uncond + guidance_scale * (cond - uncond)

  return model_fn


def sample(model, tokens, mask, key, *, image_shape, num_steps: int = 50, guidance_scale: float = 4.5,
           sampler: str = "ddim", null_context=None, null_mask=None, x_T=None, step_noise=None,
           return_trajectory: bool = False):
  """Samples [B, H, W, C] from noise (`x_T`, else drawn from `key`: one key, or one per image).

  `tokens`, `mask`: the model's text input (T5 features [B, L, D] and mask [B, L]).
  `null_context`, `null_mask` [L', D], [L']: the unconditional text (default: the
  empty prompt, an all-False mask). `sampler`: "ddim" (eta 0) or "ddpm" (ancestral;
  its noise from `key` or `step_noise` [num_steps, B, H, W, C]).
  """
  if sampler not in schema.DDPM_SAMPLERS:
    raise ValueError(f"sampler must be one of {schema.DDPM_SAMPLERS} for prediction='epsilon', got {sampler!r}")
  b = tokens.shape[0]
  cache = model.encode_prompt(tokens, mask)
  null_cache = None
  if null_context is not None:
    pad = tokens.shape[1] - null_context.shape[0]
    if pad < 0:
      raise ValueError(f"null_context has {null_context.shape[0]} tokens, more than the prompts' {tokens.shape[1]}")
    null_context = jnp.pad(jnp.asarray(null_context, tokens.dtype), ((0, pad), (0, 0)))
    null_mask = jnp.pad(jnp.asarray(null_mask, bool), (0, pad))
    null_cache = model.encode_prompt(jnp.broadcast_to(null_context, (b,) + null_context.shape),
                                     jnp.broadcast_to(null_mask, (b,) + null_mask.shape))
  model_fn = _guided(model, cache, null_cache, guidance_scale)
  if x_T is None:
    if key.ndim == 0:
      x_T = jax.random.normal(key, (b,) + tuple(image_shape), jnp.float32)
    else:
      x_T = jax.vmap(lambda k: jax.random.normal(k, tuple(image_shape), jnp.float32))(key)
    key = jax.random.fold_in(key, 1) if key.ndim == 0 else jax.vmap(jax.random.fold_in, (0, None))(key, 1)
  proc = diffusion(model.dit.config.learn_sigma, num_steps)
  loop = proc.ddim_sample_loop if sampler == "ddim" else proc.p_sample_loop
  return loop(model_fn, x_T, key=key, step_noise=step_noise, return_trajectory=return_trajectory)
