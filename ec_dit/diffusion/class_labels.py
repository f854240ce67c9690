"""Training losses and samplers of class-conditional models (DiT-MoE), driven by `config.class_diffusion`.

Two objectives, as DiT-MoE's checkpoints were trained:

* "ddpm" (its S and B models): DiT's Gaussian diffusion (`ec_dit.diffusion.ddpm`): MSE on
  the noise plus the variational bound term for the learned variance; sampled
  ancestrally ("ddpm") or by DDIM ("ddim") over `num_sampling_steps` respaced steps.
* "rectified_flow" (its XL and G models): DiT-MoE's `rectified_flow.py`:
  x_t = (1 - t) x0 + t eps with t = sigmoid(N(0, 1)), the network (fed t in
  [0, 1] as is) predicts eps - x0 in its first C channels; sampled with Euler
  steps from t = 1 ("euler").

The model is any `out, aux = model(x_t, t, labels, drop_mask=...)`
(`ec_dit.model.dit_moe.DiTMoE`). Labels equal to `num_classes` are the null
class. Training drops labels with probability `model.class_cond.class_dropout`.

Classifier-free guidance (`guided_model`) follows DiT's `forward_with_cfg` for
DDPM: with `guidance_channels = 3` only the first three noise channels are
guided and the rest (the fourth noise channel and the variance) are the
conditional output. DiT did that "for exact reproducibility reasons", and
DiT-MoE's sample.py inherits it, so imported checkpoints reproduce their authors'
samples only with it (`configs/dit_moe.py` sets it). 0 guides every noise
channel. Rectified flow guides all channels, as DiT-MoE's sampler.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ec_dit.diffusion import ddpm


def make_diffusion(config, *, sampling: bool = False) -> ddpm.Diffusion:
  """The DDPM process of `config.class_diffusion`: all steps (training) or respaced (`sampling`)."""
  d = config.class_diffusion
  betas = ddpm.linear_betas(d.num_timesteps, d.beta_start, d.beta_end)
  keep = ddpm.space_timesteps(d.num_timesteps, str(d.num_sampling_steps)) if sampling else None
  return ddpm.Diffusion.create(betas, use_timesteps=keep, learn_sigma=config.model.class_cond.learn_sigma)


def label_drop_mask(key, batch: int, class_dropout: float) -> jax.Array:
  """True where a label is replaced by the null class (DiT's `token_drop`)."""
  return jax.random.uniform(key, (batch,)) < class_dropout


def ddpm_loss(model, x0, labels, key, diffusion: ddpm.Diffusion, class_dropout: float):
  """DiT's training loss: mean over the batch of MSE + VB at uniform timesteps, plus the MoE aux loss."""
  k_t, k_noise, k_drop = jax.random.split(key, 3)
  b = x0.shape[0]
  t = jax.random.randint(k_t, (b,), 0, diffusion.num_timesteps)
  noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
  drop = label_drop_mask(k_drop, b, class_dropout)
  terms, aux = diffusion.training_losses(lambda x, tt: model(x, tt, labels, drop_mask=drop), x0, t, noise)
  loss = jnp.mean(terms["loss"]) + aux["aux_loss"]
  return loss, {"mse": jnp.mean(terms["mse"]), "vb": jnp.mean(terms["vb"]), "aux_loss": aux["aux_loss"],
                "moe": aux["moe"]}


def rectified_flow_loss(model, x0, labels, key, class_dropout: float):
  """DiT-MoE's RectifiedFlow.forward: MSE between eps - x0 and the first C output channels, plus aux."""
  k_t, k_noise, k_drop = jax.random.split(key, 3)
  b, c = x0.shape[0], x0.shape[-1]
  t = jax.nn.sigmoid(jax.random.normal(k_t, (b,)))
  eps = jax.random.normal(k_noise, x0.shape, x0.dtype)
  tt = t.reshape(-1, 1, 1, 1)
  out, aux = model((1 - tt) * x0 + tt * eps, t, labels, drop_mask=label_drop_mask(k_drop, b, class_dropout))
  mse = jnp.mean(jnp.square(eps - x0 - out[..., :c]))
  return mse + aux["aux_loss"], {"mse": mse, "vb": jnp.zeros(()), "aux_loss": aux["aux_loss"], "moe": aux["moe"]}


def loss(model, batch, key, config):
  """The class-conditional training loss of `config`: batch {"image": [B, H, W, C] latents, "label": [B] int}."""
  class_dropout = config.model.class_cond.class_dropout
  if config.class_diffusion.objective == "ddpm":
    return ddpm_loss(model, batch["image"], batch["label"], key, make_diffusion(config), class_dropout)
  return rectified_flow_loss(model, batch["image"], batch["label"], key, class_dropout)


def guided_model(model, labels, null_class: int, guidance_scale: float, guidance_channels: int = 0):
  """`fn(x, t) -> output` with DiT's `forward_with_cfg` guidance (a batched conditional + null pass).

  guidance_channels: how many leading output channels are guided; the others are
  the conditional output. 0 = all of x's channels (every noise channel).
  """
  def fn(x, t):
    if guidance_scale == 1.0:
      return model(x, t, labels)[0]
    b, c = x.shape[0], x.shape[-1]
    g = guidance_channels or c
    out = model(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                jnp.concatenate([labels, jnp.full_like(labels, null_class)]))[0]
    cond, uncond = out[:b], out[b:]
    guided = uncond[..., :g] + guidance_scale * (cond[..., :g] - uncond[..., :g])
    return jnp.concatenate([guided, cond[..., g:]], axis=-1)

  return fn


def rectified_flow_sample(model, labels, x_T, *, num_steps: int, guidance_scale: float, null_class: int,
                          return_trajectory: bool = False):
  """DiT-MoE's RectifiedFlow.sample: Euler from t = 1 to 0, guidance on the first C channels (all of eps - x0)."""
  b, c = x_T.shape[0], x_T.shape[-1]
  dt = 1.0 / num_steps

  def velocity(z, t):
    if guidance_scale == 1.0:
      return model(z, t, labels)[0][..., :c]
    out = model(jnp.concatenate([z, z]), jnp.concatenate([t, t]),
                jnp.concatenate([labels, jnp.full_like(labels, null_class)]))[0][..., :c]
    vc, vu = out[:b], out[b:]
    return vu + guidance_scale * (vc - vu)

  def body(z, i):
    t = jnp.full((b,), (num_steps - i) / num_steps, jnp.float32)
    z = z - dt * velocity(z, t)
    return z, (z if return_trajectory else None)

  z, traj = jax.lax.scan(body, x_T, jnp.arange(num_steps))
  return traj if return_trajectory else z


def sample(model, labels, x_T, config, *, key=None, step_noise=None, sampler: str | None = None,
           num_steps: int | None = None, guidance_scale: float | None = None, return_trajectory: bool = False):
  """Latents [B, H, W, C] for `labels` from the initial noise x_T, with `config.class_diffusion`'s sampler.

  Settings left as None come from `config.class_diffusion`. `key` (one, or one per
  image) or `step_noise` [steps, B, H, W, C] feed the ancestral sampler's noise.
  """
  d = config.class_diffusion
  sampler = sampler or d.sampler
  num_steps = int(num_steps or d.num_sampling_steps)
  scale = float(d.guidance_scale if guidance_scale is None else guidance_scale)
  null_class = config.model.class_cond.num_classes
  if sampler == "euler":
    return rectified_flow_sample(model, labels, x_T, num_steps=num_steps, guidance_scale=scale,
                                 null_class=null_class, return_trajectory=return_trajectory)
  if sampler not in ("ddpm", "ddim"):
    raise ValueError(f"sampler must be one of ('ddpm', 'ddim', 'euler'), got {sampler!r}")
  b = ddpm.linear_betas(d.num_timesteps, d.beta_start, d.beta_end)
  diffusion = ddpm.Diffusion.create(b, use_timesteps=ddpm.space_timesteps(d.num_timesteps, str(num_steps)),
                                    learn_sigma=config.model.class_cond.learn_sigma)
  fn = guided_model(model, labels, null_class, scale, d.guidance_channels)
  loop = diffusion.p_sample_loop if sampler == "ddpm" else diffusion.ddim_sample_loop
  return loop(fn, x_T, key=key, step_noise=step_noise, return_trajectory=return_trajectory)
