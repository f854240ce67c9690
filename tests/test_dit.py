"""DiT in ec-dit: facebookresearch/DiT state dicts and diffusers' DiTTransformer2DModel, against their outputs.

Fixtures: `tests/fixtures/pixart/make_fixtures.py` (run by hand with torch, diffusers
0.42.1 and facebookresearch/DiT's models.py); CI compares without torch.
"""

import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ec_dit.diffusion import class_labels as class_diffusion
from ec_dit.diffusion import ddpm
from ec_dit.convert import dit, mapping
from ec_dit.tools import model_summary
from helpers import load_config

HERE = os.path.dirname(os.path.abspath(__file__))
DIFFUSERS = os.path.join(HERE, "fixtures", "dit", "dit_diffusers")
FACEBOOK = os.path.join(HERE, "fixtures", "dit", "dit_facebook.pt")


def _inputs(ref):
  return jnp.asarray(ref["x"]), jnp.asarray(ref["t"], jnp.float32), jnp.asarray(ref["y"])


def test_facebook_state_dict_matches_models_py_with_and_without_guidance():
  model, config = dit.load(FACEBOOK, num_heads=2)
  assert config.model.class_cond.ffn_style == "dit" and config.model.class_cond.learn_sigma
  ref = np.load(FACEBOOK.replace(".pt", ".npz"))
  out, aux = model(*_inputs(ref))
  assert out.shape[-1] == 8 and not aux["moe"]
  np.testing.assert_allclose(np.asarray(out), ref["out"], atol=1e-4, rtol=0)
  # forward_with_cfg at scale 4: DiT guides the first 3 channels (config.class_diffusion.guidance_channels = 3)
  x, t, _ = _inputs(ref)
  fn = class_diffusion.guided_model(model, jnp.asarray([1, 5]), 10, 4.0, config.class_diffusion.guidance_channels)
  np.testing.assert_allclose(np.asarray(fn(x[:2], t[:2])), ref["cfg"][:2], atol=1e-4, rtol=0)


def test_diffusers_folder_matches_with_and_without_guidance():
  model, config = dit.load(DIFFUSERS)
  assert config.model.class_cond.timestep_shift == 1 and config.model.class_cond.mlp_norm_eps == 1e-5
  ref = np.load(os.path.join(DIFFUSERS, "reference.npz"))
  out, _ = model(*_inputs(ref))
  np.testing.assert_allclose(np.asarray(out), ref["sample"], atol=1e-4, rtol=0)
  x, t, y = _inputs(ref)
  fn = class_diffusion.guided_model(model, y, 10, 4.0, config.class_diffusion.guidance_channels)  # all noise channels
  np.testing.assert_allclose(np.asarray(fn(x, t)), ref["guided"], atol=1e-4, rtol=0)


def test_ddim_trajectory_matches_diffusers_scheduler():
  """DiTPipeline's loop with DDIMScheduler (10 leading steps, guidance 4): the same respacing in ec_dit.diffusion.ddpm."""
  model, config = dit.load(DIFFUSERS)
  ref = np.load(os.path.join(DIFFUSERS, "reference.npz"))
  proc = ddpm.Diffusion.create(ddpm.linear_betas(1000), use_timesteps=ddpm.space_timesteps(1000, "ddim10"))
  np.testing.assert_array_equal(proc.timestep_map[::-1], ref["ddim_timesteps"])
  fn = class_diffusion.guided_model(model, jnp.asarray(ref["labels"]), 10, 4.0, 0)
  traj = np.asarray(proc.ddim_sample_loop(fn, jnp.asarray(ref["z"]), return_trajectory=True))
  for step, (ours, theirs) in enumerate(zip(traj, ref["ddim_traj"])):  # grows to ~1e2: relative to each step
    assert np.abs(ours - theirs).max() <= 1e-4 * max(1.0, float(np.abs(theirs).max())), f"step {step}"


def test_refuses_mismatched_shapes_and_untied_embedders(tmp_path):
  dst = tmp_path / "ckpt"
  shutil.copytree(DIFFUSERS, dst)
  file = str(dst / "diffusion_pytorch_model.safetensors")
  tensors = load_file(file)
  tensors["proj_out_2.bias"] = np.zeros(7, np.float32)
  save_file(tensors, file)
  with pytest.raises(mapping.CheckpointMismatch, match=r"proj_out_2 \(\.bias\) has shape \(7,\)"):
    dit.load(str(dst))
  tensors = load_file(os.path.join(DIFFUSERS, "diffusion_pytorch_model.safetensors"))
  tensors["transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias"] += 1.0
  save_file(tensors, file)
  with pytest.raises(mapping.CheckpointMismatch, match=r"transformer_blocks\.1\.norm1\.emb\.timestep_embedder"):
    dit.load(str(dst))


def test_facebook_needs_heads_for_an_unreleased_width():
  with pytest.raises(ValueError, match="num_heads"):
    dit.load(FACEBOOK)


def test_summary_equals_dit_xl2_published_count():
  """DiT-XL/2 at 256 px: 675,129,632 parameters in DiT's models.py (its train.py prints it; counted here on the
  meta device with the fixture script's timm stand-ins), pos_embed included, which ec-dit computes instead."""
  config = load_config("dit", "XL-2-256")
  assert model_summary.summarize(config.model)["reference_params"] == 675_129_632
