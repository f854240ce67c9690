"""Rectified flow (EC-DiT, DiT-MoE, SD3): training loss and ODE samplers.

Forward process: x_t = (1 - t) * x0 + t * eps, t in [0, 1], t = 1 is pure noise.
The model returns the velocity v = eps - x0, so dx/dt = v and sampling
integrates from t = 1 down to t = 0. (Its network may instead predict the clean
image, `config.model.prediction = "x0"`; the DiT converts that to the velocity,
so the loss here is always velocity matching, as in JiT.) Training draws t from a logit-normal
distribution (t = sigmoid(n), n ~ N(mean, std)), which puts more weight on the
middle of the path where the velocity is hardest to predict.

The package holds the other processes beside it: `ddpm` (DiT's Gaussian diffusion), `text_ddpm`
(DDPM for epsilon-predicting text-to-image models, PixArt-alpha) and `class_labels` (the losses
and samplers of class-conditional models, DiT-MoE).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ec_dit import schema
from ec_dit.model import dit as dit_lib

SAMPLERS = schema.SAMPLERS


def sample_timesteps(key: jax.Array, batch: int, mean: float = 0.0, std: float = 1.0) -> jax.Array:
  """Logit-normal t in (0, 1): sigmoid(mean + std * N(0, 1))."""
  return jax.nn.sigmoid(mean + std * jax.random.normal(key, (batch,)))


def interpolate(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """x_t = (1 - t) x0 + t noise, t [B] broadcast over the image."""
  t = t.reshape((-1,) + (1,) * (x0.ndim - 1))
  return (1.0 - t) * x0 + t * noise


def loss_weight(t: jax.Array, t_min: float) -> jax.Array:
  """Per-example weight of the velocity loss: min(1, (t / t_min)^2); all ones when t_min = 0.

  With an x0-predicting network the velocity error is the clean-image error divided
  by t, so the plain velocity loss weights an almost-clean example (t = 0.05) 400 times
  more than a noisy one: a few nearly clean examples dominate every batch, and the
  high-noise steps that decide what goes where learn slowly. The weight caps that
  factor at 1 / t_min^2 (the clean-image error is weighted 1 / max(t, t_min)^2);
  t_min = 1 is the plain clean-image MSE.
  """
  if t_min <= 0.0:
    return jnp.ones_like(t)
  return jnp.minimum(1.0, jnp.square(t / t_min))


def rectified_flow_loss(model, images, tokens, mask, key, *, t_mean=0.0, t_std=1.0, uncond_prob=0.1,
                        loss_t_min=0.0):
  """Velocity-matching MSE plus the model's auxiliary MoE losses.

  With probability `uncond_prob` an example's text is dropped (all-False mask,
  the empty prompt), which teaches the unconditional velocity that
  classifier-free guidance needs. `loss_t_min` > 0 down-weights the examples
  with t < loss_t_min (see `loss_weight`).

  Returns (loss, aux) where aux holds `mse`, `aux_loss` and the MoE diagnostics.
  """
  k_t, k_noise, k_drop = jax.random.split(key, 3)
  b = images.shape[0]
  t = sample_timesteps(k_t, b, t_mean, t_std)
  noise = jax.random.normal(k_noise, images.shape, images.dtype)
  keep = jax.random.uniform(k_drop, (b,)) >= uncond_prob
  mask = jnp.logical_and(mask, keep[:, None])
  v, aux = model(interpolate(images, noise, t), t, tokens, mask)
  per_example = jnp.mean(jnp.square(v - (noise - images)), axis=tuple(range(1, images.ndim)))
  mse = jnp.mean(loss_weight(t, loss_t_min) * per_example)
  return mse + aux["aux_loss"], {"mse": mse, **aux}


def guide(x: jax.Array, t, v_cond: jax.Array, v_uncond: jax.Array, guidance_scale: float,
          guidance_parallel: float = 1.0) -> jax.Array:
  """Classifier-free guidance of the velocity, optionally projected.

  Standard CFG is v_cond + (s - 1) (v_cond - v_uncond). With `guidance_parallel` < 1
  the part of the update that is parallel to the conditional clean-image estimate
  x0 = x - t v_cond (per image) is scaled by it; 0 keeps only the orthogonal part. This is
  the projection of adaptive projected guidance (APG, Sadat et al. 2025) without its
  momentum and norm threshold.

  Why: the parallel part says "more or less of this image". In ShapesWorld the empty
  prompt expects about two objects, so for "a photo of a triangle" the update points
  to less object everywhere, and at scale 3 it pushes past zero: blank canvases. The
  orthogonal part keeps what guidance is for (which colour, which shape, where).
  `guidance_parallel` = 1 is exactly standard CFG.
  """
  if not 0.0 <= guidance_parallel <= 1.0:  # configs are checked by ec_dit.schema; this guards direct calls
    raise ValueError(f"guidance_parallel must be a number in [0, 1], got {guidance_parallel!r}")
  if guidance_parallel == 1.0:
    return v_uncond + guidance_scale * (v_cond - v_uncond)
  delta = v_cond - v_uncond
  x0 = x - t * v_cond
  axes = tuple(range(1, x.ndim))
  # the 1e-12 guards an all-zero estimate (an exactly mid-grey canvas)
  coef = jnp.sum(delta * x0, axes, keepdims=True) / (jnp.sum(x0 * x0, axes, keepdims=True) + 1e-12)
  return v_cond + (guidance_scale - 1.0) * (delta - (1.0 - guidance_parallel) * coef * x0)


def _recorded(record, aux, batch: int):
  """`record(aux)` cut to its first `batch` rows (the conditional half of a guided batch); None without `record`."""
  return None if record is None else jax.tree.map(lambda a: a[:batch], record(aux))


def _guided_velocity(model, cache: dit_lib.ContextCache, guidance_scale: float, guidance_parallel: float = 1.0,
                     record=None):
  """(x, t) -> (v, recorded) with classifier-free guidance; conditional and unconditional in one batch.

  The unconditional half reuses the conditional text K/V with an all-False mask,
  so the text is encoded once for both. `recorded` is `_recorded(record, aux, B)`.
  """
  if guidance_scale == 1.0:
    def unguided(x, t):
      v, aux = model.dit(x, jnp.full((x.shape[0],), t), context_cache=cache)
      return v, _recorded(record, aux, x.shape[0])
    return unguided
  both = dit_lib.ContextCache(
      kv=jax.tree.map(lambda a: jnp.concatenate([a, a]), cache.kv),
      mask=jnp.concatenate([cache.mask, jnp.zeros_like(cache.mask)]),
      # the empty prompt pools to zeros (no tokens), exactly as encode_context computes it
      pooled=None if cache.pooled is None else jnp.concatenate([cache.pooled, jnp.zeros_like(cache.pooled)]))

  def velocity(x, t):
    v, aux = model.dit(jnp.concatenate([x, x]), jnp.full((2 * x.shape[0],), t), context_cache=both)
    v_cond, v_uncond = jnp.split(v, 2)
    return guide(x, t, v_cond, v_uncond, guidance_scale, guidance_parallel), _recorded(record, aux, x.shape[0])

  return velocity


def _uncached_velocity(model, tokens, mask, guidance_scale, guidance_parallel=1.0, record=None):
  """Reference path: re-encodes the text at every step (for testing the cache)."""
  def velocity(x, t):
    tt = jnp.full((x.shape[0],), t)
    v_cond, aux = model(x, tt, tokens, mask)
    if guidance_scale == 1.0:
      return v_cond, _recorded(record, aux, x.shape[0])
    v_uncond, _ = model(x, tt, tokens, jnp.zeros_like(mask))
    return guide(x, t, v_cond, v_uncond, guidance_scale, guidance_parallel), _recorded(record, aux, x.shape[0])
  return velocity


def sample(model, tokens: jax.Array, mask: jax.Array, key: jax.Array, *, image_shape, num_steps: int = 32,
           guidance_scale: float = 1.0, guidance_parallel: float = 1.0, sampler: str = "euler",
           cache_text: bool = True, record=None):
  """Generates images in [-1, 1] (float32 [B, H, W, C]) by stepping from t=1 (noise) to t=0.

  Args:
    model: a `TextToImage` in eval mode.
    tokens, mask: [B, L] tokenized prompts (an all-False row is the empty prompt).
    key: a PRNG key, or one key per image ([B] keys) so that each image's noise
      does not depend on the batch it is generated in. Deterministic given keys.
    image_shape: (H, W, C).
    num_steps: steps from t=1 to 0 (Heun uses 2 model evaluations per step but the last).
    guidance_scale: classifier-free guidance; 1.0 disables it.
    guidance_parallel: weight of the guidance update's component along the conditional
      clean-image estimate (`guide`): 1.0 is standard CFG, 0.0 projected guidance.
    sampler: "euler" or "heun" (the ODE), or "ancestral": DDPM-style stochastic
      steps that re-draw part of the noise at every step (`ancestral_step`).
    cache_text: compute the text K/V once per run (Nucleus-Image) instead of every step.
    record: optional `record(aux) -> pytree of [B, ...] arrays`, applied to the model's aux output
      (`aux["moe"]`: the MoE diagnostics) at each step's first evaluation; the sampler keeps the
      conditional prompts' rows. With it, `sample` returns (images, records), each leaf of records
      stacked over the steps: [num_steps, B, ...]. The images are those of the same call without it.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
  if cache_text:
    velocity = _guided_velocity(model, model.encode_prompt(tokens, mask), guidance_scale, guidance_parallel, record)
  else:
    velocity = _uncached_velocity(model, tokens, mask, guidance_scale, guidance_parallel, record)

  def normal(k):  # one draw per image when keys are per image, so batching never changes an image
    if k.ndim == 0:
      return jax.random.normal(k, (tokens.shape[0],) + tuple(image_shape), jnp.float32)
    return jax.vmap(lambda ki: jax.random.normal(ki, tuple(image_shape), jnp.float32))(k)

  x = normal(key)
  ts = jnp.linspace(1.0, 0.0, num_steps + 1)

  def euler_step(x, i):
    dt = ts[i + 1] - ts[i]
    v, recorded = velocity(x, ts[i])
    return x + dt * v, recorded

  def heun_step(x, i):
    dt = ts[i + 1] - ts[i]
    v1, recorded = velocity(x, ts[i])
    v2, _ = velocity(x + dt * v1, ts[i + 1])
    return x + dt * 0.5 * (v1 + v2), recorded

  def ancestral(x, i):
    step_key = jax.vmap(jax.random.fold_in, (0, None))(key, i) if key.ndim else jax.random.fold_in(key, i)
    v, recorded = velocity(x, ts[i])
    return ancestral_step(x, v, ts[i], ts[i + 1], normal(step_key)), recorded

  if sampler == "euler":
    x, records = jax.lax.scan(euler_step, x, jnp.arange(num_steps))
  elif sampler == "ancestral":
    x, records = jax.lax.scan(ancestral, x, jnp.arange(num_steps))
  else:  # Heun on every step but the last, which ends at t = 0 with an Euler step (as in EDM)
    x, records = jax.lax.scan(heun_step, x, jnp.arange(num_steps - 1))
    x, last = euler_step(x, num_steps - 1)
    records = jax.tree.map(lambda steps, a: jnp.concatenate([steps, a[None]]), records, last)
  return x if record is None else (x, records)


def ancestral_step(x: jax.Array, v: jax.Array, t, s, z: jax.Array) -> jax.Array:
  """One stochastic step from time t to s < t: a draw from the DDPM posterior q(x_s | x_t, x0).

  With alpha = 1 - t and sigma = t, the velocity gives the clean image and the noise,
  x0 = x - t v and eps = x + (1 - t) v. The posterior puts x_s at
  alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z with c^2 = sigma_s^2 (1 - snr_t / snr_s):
  part of the predicted noise is replaced by fresh noise z, so errors made at one
  step are partly forgotten at the next (DDIM, Song et al. 2021, with eta = 1).
  With c = 0 this would be exactly the Euler step. At s = 0 it returns x0.
  """
  x0, eps = x - t * v, x + (1.0 - t) * v
  alpha_t, alpha_s = 1.0 - t, 1.0 - s
  # snr_t / snr_s = (alpha_t s / (t alpha_s))^2, in [0, 1) for s < t; t = 1 gives 0 (pure noise)
  ratio = jnp.square(alpha_t * s / (t * alpha_s))
  c = s * jnp.sqrt(jnp.clip(1.0 - ratio, 0.0, 1.0))
  return alpha_s * x0 + jnp.sqrt(jnp.maximum(s * s - c * c, 0.0)) * eps + c * z


def to_uint8(images: jax.Array):
  """[-1, 1] floats -> uint8 numpy images."""
  import numpy as np
  return np.asarray(jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255)).astype(np.uint8)
