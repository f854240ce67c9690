"""DDPM (DiT's diffusion package) and DiT-MoE's rectified flow: parity with the reference on the tiny fixtures.

The trajectories start from the reference's noise; the ancestral sampler is fed the
noise the reference drew at each step (recorded by make_fixtures.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ec_dit.diffusion import class_labels as class_diffusion
from ec_dit.diffusion import ddpm
from dit_moe_fixtures import nchw, nhwc, reference, tiny_config, tiny_model


def test_linear_betas_and_respacing_match_dit():
  betas = ddpm.linear_betas(1000)
  assert betas[0] == 1e-4 and betas[-1] == 0.02 and len(betas) == 1000
  assert sorted(ddpm.space_timesteps(1000, "10")) == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
  assert sorted(ddpm.space_timesteps(1000, "ddim10")) == list(range(0, 1000, 100))
  assert len(ddpm.space_timesteps(1000, "250")) == 250
  # DiT's docstring example: 300 steps, sections [10, 15, 20]
  steps = sorted(ddpm.space_timesteps(300, [10, 15, 20]))
  assert len(steps) == 45 and steps[:2] == [0, 11] and steps[-1] == 299
  np.testing.assert_array_equal(ddpm.Diffusion.create(betas, use_timesteps=ddpm.space_timesteps(1000, "10"))
                                .timestep_map, reference()["timestep_map"])
  with pytest.raises(ValueError, match="cannot divide a section of 1000 steps into 1001"):
    ddpm.space_timesteps(1000, "1001")


def test_respaced_process_keeps_the_cumulative_alphas():
  full = ddpm.Diffusion.create(ddpm.linear_betas(1000))
  spaced = ddpm.Diffusion.create(ddpm.linear_betas(1000), use_timesteps=[0, 499, 999])
  np.testing.assert_allclose(spaced.tables["alphas_cumprod"], full.tables["alphas_cumprod"][[0, 499, 999]])


def test_training_loss_terms_equal_dit():
  """MSE and the variational bound term per example (t = 0 is the decoder NLL), training mode, label 1 dropped."""
  ref = reference()
  model = tiny_model()
  diffusion = ddpm.Diffusion.create(ddpm.linear_betas(1000))
  y, drop = jnp.asarray(ref["y"]), jnp.asarray(ref["drop"] == 1)

  @jax.jit
  def terms(params):
    m = nnx.merge(graphdef, params)
    return diffusion.training_losses(lambda x, t: m(x, t, y, drop_mask=drop), nhwc(ref["loss_x0"]),
                                     jnp.asarray(ref["t"]), nhwc(ref["loss_noise"]))[0]

  graphdef, params = nnx.split(model)
  out = terms(params)
  np.testing.assert_allclose(out["mse"], ref["loss_mse"], atol=1e-4, rtol=1e-5)
  np.testing.assert_allclose(out["vb"], ref["loss_vb"], atol=1e-4, rtol=1e-5)
  assert ref["loss_vb"][0] > 1.0  # t = 0: the discretised decoder NLL, not the KL


def _trajectory(sampler, guidance_scale, **kw):
  ref = reference()
  config = tiny_config()
  config.class_diffusion.num_sampling_steps = 10
  model = tiny_model(config)
  model.eval()
  graphdef, params = nnx.split(model)

  @jax.jit
  def run(params, step_noise):
    return class_diffusion.sample(nnx.merge(graphdef, params), jnp.asarray(ref["labels"]), nhwc(ref["z"]), config,
                                  sampler=sampler, guidance_scale=guidance_scale, step_noise=step_noise,
                                  return_trajectory=True)

  return nchw(run(params, kw.get("step_noise"))), ref


def _assert_trajectory_close(ours, theirs):
  """Each step within 1e-4 of the step's scale: a random network's x0 predictions carry 1/sqrt(abar) (up to
  158x) into x_t, so the reference's values reach the hundreds; the errors are ~1e-6 of that."""
  assert ours.shape == theirs.shape == (10, 2, 4, 8, 8)
  for k in range(10):
    scale = max(1.0, float(np.abs(theirs[k]).max()))
    err = float(np.abs(ours[k] - theirs[k]).max())
    assert err <= 1e-4 * scale, f"step {k}: max error {err} at scale {scale}"


def test_ddpm_ancestral_trajectory_with_dit_guidance_equals_the_reference():
  ours, ref = _trajectory("ddpm", 4.0, step_noise=nhwc(reference()["ddpm_noise"]))
  _assert_trajectory_close(ours, ref["ddpm_traj"])
  np.testing.assert_allclose(ours[0], ref["ddpm_traj"][0], atol=1e-4)  # the first step is O(1): absolute too


def test_ddim_trajectory_equals_the_reference():
  ours, ref = _trajectory("ddim", 1.0)
  _assert_trajectory_close(ours, ref["ddim_traj"])
  np.testing.assert_allclose(ours[0], ref["ddim_traj"][0], atol=1e-4)


def test_rectified_flow_euler_trajectory_equals_dit_moe():
  ours, ref = _trajectory("euler", 7.0)
  np.testing.assert_allclose(ours, ref["rf_traj"], atol=1e-4, rtol=0)


def test_guidance_follows_forward_with_cfg():
  """Only the first `guidance_channels` channels are guided; the rest are the conditional output."""
  def model(x, t, labels):
    return jnp.where((labels == 10)[:, None, None, None], -1.0, 1.0) * jnp.ones(x.shape[:-1] + (8,)), {}

  x, t = jnp.zeros((2, 2, 2, 4)), jnp.zeros((2,))
  out = class_diffusion.guided_model(model, jnp.array([1, 2]), 10, 4.0, 3)(x, t)
  np.testing.assert_array_equal(out[0, 0, 0], [7, 7, 7, 1, 1, 1, 1, 1])  # -1 + 4 * (1 - -1) = 7
  out = class_diffusion.guided_model(model, jnp.array([1, 2]), 10, 4.0, 0)(x, t)
  np.testing.assert_array_equal(out[0, 0, 0], [7, 7, 7, 7, 1, 1, 1, 1])


def test_rectified_flow_loss_is_dit_moes():
  """DiT-MoE's RectifiedFlow.forward: x_t = (1 - t) x0 + t eps, target eps - x0 on the first C channels.
  (The DDPM loss's gradients are exercised by the sharded training test.)"""
  config = tiny_config()
  model = tiny_model(config)
  model.eval()
  x0, labels, key = jax.random.normal(jax.random.key(0), (4, 8, 8, 4)), jnp.array([0, 1, 2, 3]), jax.random.key(1)
  loss, aux = jax.jit(lambda: class_diffusion.rectified_flow_loss(model, x0, labels, key, 0.0))()
  k_t, k_noise, _ = jax.random.split(key, 3)
  t = jax.nn.sigmoid(jax.random.normal(k_t, (4,)))
  eps = jax.random.normal(k_noise, x0.shape)
  tt = t[:, None, None, None]
  out = jax.jit(lambda: model((1 - tt) * x0 + tt * eps, t, labels)[0])()
  np.testing.assert_allclose(loss, np.mean((eps - x0 - out[..., :4]) ** 2), rtol=1e-5)
  assert float(aux["aux_loss"]) == 0.0  # eval mode: no balance loss
