"""Gaussian diffusion (DDPM) as in DiT's `diffusion` package (from OpenAI's improved / guided diffusion).

What DiT and DiT-MoE's S and B models use: linear betas (1e-4 to 0.02 over 1000
steps), an epsilon-predicting network with a learned-range variance (its output
has 2C channels: noise, then v in [-1, 1] interpolating the log variance between
the posterior variance and beta), trained with MSE plus the variational bound
term (`training_losses`), and sampled with respaced steps (`space_timesteps`,
`Diffusion.create(..., use_timesteps=...)`) by the ancestral sampler
(`p_sample_loop`) or DDIM (`ddim_sample_loop`).

Tables are computed in float64 numpy and cast to float32 where used, as the
reference does. Images are channels-last [B, H, W, C]. `model_fn(x, t)` gets the
*original* timesteps (the respaced index mapped through `timestep_map`, as DiT's
`_WrappedModel`) as float32 and returns the network output [B, H, W, 2C] (or C
without learned sigma). Samplers take explicit noise (`step_noise`) so a test can
feed the reference's draws; otherwise they draw from a key.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
  """DiT's "linear" schedule: Ho et al.'s betas, scaled by 1000 / num_timesteps (float64)."""
  scale = 1000.0 / num_timesteps
  return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts) -> set[int]:
  """DiT's `space_timesteps`: which original steps a respaced process keeps.

  `section_counts` is a count per equal section ("250" or [10, 15, 20] or "10,15,20"),
  or "ddimN" for the DDIM paper's fixed stride.
  """
  if isinstance(section_counts, str):
    if section_counts.startswith("ddim"):
      desired = int(section_counts[len("ddim"):])
      for i in range(1, num_timesteps):
        if len(range(0, num_timesteps, i)) == desired:
          return set(range(0, num_timesteps, i))
      raise ValueError(f"cannot create exactly {desired} steps from {num_timesteps} with an integer stride")
    section_counts = [int(x) for x in section_counts.split(",")]
  if isinstance(section_counts, int):
    section_counts = [section_counts]
  size_per, extra = divmod(num_timesteps, len(section_counts))
  start, steps = 0, []
  for i, count in enumerate(section_counts):
    size = size_per + (1 if i < extra else 0)
    if size < count:
      raise ValueError(f"cannot divide a section of {size} steps into {count}")
    stride = 1 if count <= 1 else (size - 1) / (count - 1)
    cur = 0.0
    for _ in range(count):
      steps.append(start + round(cur))
      cur += stride
    start += size
  return set(steps)


def _normal_kl(mean1, logvar1, mean2, logvar2):
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def _approx_standard_normal_cdf(x):
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * jnp.power(x, 3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
  """Log-likelihood (nats) of x in [-1, 1] discretised to 256 bins under N(means, exp(log_scales)^2)."""
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
  cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _mean_flat(x):
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


@dataclasses.dataclass(frozen=True, eq=False)
class Diffusion:
  """A (possibly respaced) Gaussian diffusion with float64 tables; `learn_sigma` picks learned-range variance.

  Without learned sigma the variance is DiT's FIXED_LARGE (betas, with the
  first entry replaced by the posterior variance).
  """
  betas: np.ndarray
  timestep_map: np.ndarray
  learn_sigma: bool = True

  @classmethod
  def create(cls, betas: np.ndarray, *, use_timesteps=None, learn_sigma: bool = True) -> "Diffusion":
    """The process of `betas`, or its respacing to the steps `use_timesteps` (DiT's SpacedDiffusion)."""
    betas = np.asarray(betas, np.float64)
    if use_timesteps is None:
      return cls(betas, np.arange(len(betas)), learn_sigma)
    alphas_cumprod = np.cumprod(1.0 - betas)
    keep = sorted(set(int(t) for t in use_timesteps))
    if not keep or keep[0] < 0 or keep[-1] >= len(betas):
      raise ValueError(f"use_timesteps must lie in [0, {len(betas)}), got {keep[:3]}...{keep[-3:]}")
    last, new_betas = 1.0, []
    for i in keep:
      new_betas.append(1.0 - alphas_cumprod[i] / last)
      last = alphas_cumprod[i]
    return cls(np.asarray(new_betas), np.asarray(keep), learn_sigma)

  def __post_init__(self):
    b = self.betas
    ac = np.cumprod(1.0 - b)
    ac_prev = np.append(1.0, ac[:-1])
    t = {
        "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": np.sqrt(ac), "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac), "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
        "posterior_variance": b * (1.0 - ac_prev) / (1.0 - ac),
        "posterior_mean_coef1": b * np.sqrt(ac_prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(1.0 - b) / (1.0 - ac),
        "log_betas": np.log(b),
    }
    pv = t["posterior_variance"]
    t["posterior_log_variance_clipped"] = np.log(np.append(pv[1], pv[1:]))
    fixed_large = np.append(pv[1], b[1:])
    t["fixed_large_log_variance"] = np.log(fixed_large)
    object.__setattr__(self, "tables", t)

  @property
  def num_timesteps(self) -> int:
    return len(self.betas)

  def _at(self, name: str, t: jax.Array) -> jax.Array:
    """Table `name` at integer steps t [B], float32, shaped [B, 1, 1, 1]."""
    return jnp.asarray(self.tables[name], jnp.float32)[t].reshape(-1, 1, 1, 1)

  def model_timesteps(self, t: jax.Array) -> jax.Array:
    """The original timesteps the network sees for respaced steps t, as float32."""
    return jnp.asarray(self.timestep_map, jnp.float32)[t]

  def q_sample(self, x0, t, noise):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
    return self._at("sqrt_alphas_cumprod", t) * x0 + self._at("sqrt_one_minus_alphas_cumprod", t) * noise

  def q_posterior(self, x0, x_t, t):
    """Mean and clipped log variance of q(x_{t-1} | x_t, x0)."""
    mean = self._at("posterior_mean_coef1", t) * x0 + self._at("posterior_mean_coef2", t) * x_t
    return mean, self._at("posterior_log_variance_clipped", t)

  def p_mean_variance(self, model_out, x, t, clip_denoised: bool = False):
    """From the network output: (mean, log_variance, pred_xstart) of p(x_{t-1} | x_t)."""
    c = x.shape[-1]
    if self.learn_sigma:
      eps, var_values = model_out[..., :c], model_out[..., c:]
      min_log, max_log = self._at("posterior_log_variance_clipped", t), self._at("log_betas", t)
      frac = (var_values + 1) / 2
      log_variance = frac * max_log + (1 - frac) * min_log
    else:
      eps = model_out[..., :c]
      log_variance = jnp.broadcast_to(self._at("fixed_large_log_variance", t), x.shape)
    pred_xstart = self._at("sqrt_recip_alphas_cumprod", t) * x - self._at("sqrt_recipm1_alphas_cumprod", t) * eps
    if clip_denoised:
      pred_xstart = jnp.clip(pred_xstart, -1, 1)
    mean, _ = self.q_posterior(pred_xstart, x, t)
    return mean, log_variance, pred_xstart

  def vb_terms_bpd(self, model_out, x0, x_t, t):
    """The variational bound term per example, in bits: the decoder NLL at t = 0, else the KL."""
    true_mean, true_log_var = self.q_posterior(x0, x_t, t)
    mean, log_var, _ = self.p_mean_variance(model_out, x_t, t)
    kl = _mean_flat(_normal_kl(true_mean, true_log_var, mean, log_var)) / np.log(2.0)
    nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / np.log(2.0)
    return jnp.where(t == 0, nll, kl)

  def training_losses(self, model_fn, x0, t, noise):
    """DiT's `training_losses` (LossType.MSE): per-example {"loss", "mse", "vb"} and the model's aux.

    With learned sigma the VB term trains only the variance channels (the noise
    prediction is frozen inside it), so it does not pull on the mean.
    """
    x_t = self.q_sample(x0, t, noise)
    model_out, aux = model_fn(x_t, self.model_timesteps(t))
    c = x0.shape[-1]
    terms = {"mse": _mean_flat(jnp.square(noise - model_out[..., :c]))}
    if self.learn_sigma:
      frozen = jnp.concatenate([jax.lax.stop_gradient(model_out[..., :c]), model_out[..., c:]], axis=-1)
      terms["vb"] = self.vb_terms_bpd(frozen, x0, x_t, t)
      terms["loss"] = terms["mse"] + terms["vb"]
    else:
      terms["vb"] = jnp.zeros_like(terms["mse"])
      terms["loss"] = terms["mse"]
    return terms, aux

  def _loop(self, step, model_fn, x_T, key, step_noise, return_trajectory):
    n, b = self.num_timesteps, x_T.shape[0]

    def body(x, k):
      i = n - 1 - k
      t = jnp.full((b,), i, jnp.int32)
      z = step_noise[k] if step_noise is not None else _normal(key, k, x.shape)
      x = step(model_fn(x, self.model_timesteps(t)), x, t, z)
      return x, (x if return_trajectory else None)

    x, traj = jax.lax.scan(body, x_T, jnp.arange(n))
    return traj if return_trajectory else x

  def p_sample_loop(self, model_fn, x_T, *, key=None, step_noise=None, clip_denoised: bool = False,
                    return_trajectory: bool = False):
    """Ancestral sampling from x_T over every step of this (respaced) process.

    Noise of step k (k = 0 first) is `step_noise[k]` when given, else drawn from
    `key` (one key, or one per image [B] so batching never changes an image).
    Returns the final sample, or all steps' samples [num_timesteps, B, ...].
    """
    def step(out, x, t, z):
      mean, log_var, _ = self.p_mean_variance(out, x, t, clip_denoised)
      nonzero = (t != 0).astype(x.dtype).reshape(-1, 1, 1, 1)
      return mean + nonzero * jnp.exp(0.5 * log_var) * z

    return self._loop(step, model_fn, x_T, key, step_noise, return_trajectory)

  def ddim_sample_loop(self, model_fn, x_T, *, eta: float = 0.0, key=None, step_noise=None,
                       clip_denoised: bool = False, return_trajectory: bool = False):
    """DDIM (eta = 0: deterministic) over every step of this (respaced) process; noise as `p_sample_loop`."""
    def step(out, x, t, z):
      _, _, x0 = self.p_mean_variance(out, x, t, clip_denoised)
      eps = (self._at("sqrt_recip_alphas_cumprod", t) * x - x0) / self._at("sqrt_recipm1_alphas_cumprod", t)
      ab, ab_prev = self._at("alphas_cumprod", t), self._at("alphas_cumprod_prev", t)
      sigma = eta * jnp.sqrt((1 - ab_prev) / (1 - ab)) * jnp.sqrt(1 - ab / ab_prev)
      mean = x0 * jnp.sqrt(ab_prev) + jnp.sqrt(1 - ab_prev - sigma ** 2) * eps
      nonzero = (t != 0).astype(x.dtype).reshape(-1, 1, 1, 1)
      return mean + nonzero * sigma * z

    if eta == 0.0 and step_noise is None and key is None:
      key = jax.random.key(0)  # drawn but multiplied by sigma = 0
    return self._loop(step, model_fn, x_T, key, step_noise, return_trajectory)


def _normal(key, k, shape):
  """Standard normal noise for step k: per image when `key` holds one key per image."""
  if key is None:
    raise ValueError("pass key or step_noise to the sampler")
  if key.ndim == 1:
    return jax.vmap(lambda kk: jax.random.normal(jax.random.fold_in(kk, k), shape[1:]))(key)
  return jax.random.normal(jax.random.fold_in(key, k), shape)
