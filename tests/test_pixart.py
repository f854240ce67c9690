"""PixArt-alpha in ec-dit: parity with diffusers' PixArtTransformer2DModel, its DDIM trajectory, checks, param count.

Fixtures: `tests/fixtures/pixart/make_fixtures.py` (run by hand with torch and
diffusers 0.42.1); CI compares against the committed outputs, without torch.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ec_dit import schema, tasks
from ec_dit.diffusion import text_ddpm
from ec_dit.convert import mapping, pixart
from ec_dit.encoders import hf_checkpoint
from ec_dit.model import text_to_image
from helpers import load_config

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(HERE, "fixtures", "pixart", "pixart_tiny")
MS = os.path.join(HERE, "fixtures", "pixart", "pixart_ms")

# PixArt-alpha XL/2 as diffusers builds it from the hub's config.json (PixArt-alpha/PixArt-XL-2-{256x256,512x512,
# 1024-MS}/transformer: 16 heads x 72, 28 layers, caption_channels 4096, out_channels 8): sum(p.numel()) of
# PixArtTransformer2DModel on the meta device, diffusers 0.42.1. The 1024 model adds the micro-condition embedders.
PUBLISHED_PARAMS = {256: 610_856_096, 512: 610_856_096, 1024: 611_349_152}


def _forward(folder):
  model, config = pixart.load(folder)
  ref = np.load(os.path.join(folder, "reference.npz"))
  micro = (ref["resolution"], ref["aspect_ratio"]) if "resolution" in ref else None
  out, _ = model.dit(jnp.asarray(ref["x"]), jnp.asarray(ref["t"], jnp.float32), jnp.asarray(ref["context"]),
                     jnp.asarray(ref["mask"]), micro=micro)
  return model, config, ref, np.asarray(out)


def test_padded_batch_matches_diffusers():
  model, config, ref, out = _forward(TINY)
  assert config.model.learn_sigma and config.model.conditioning == "adaln_single" and out.shape[-1] == 8
  assert not ref["mask"].all()  # rows padded to 4 and 1 of 7 tokens
  np.testing.assert_allclose(out, ref["sample"], atol=1e-4, rtol=0)
  # the model as a whole (T5 features in) is the same call
  whole, _ = model(jnp.asarray(ref["x"]), jnp.asarray(ref["t"], jnp.float32), jnp.asarray(ref["context"]),
                   jnp.asarray(ref["mask"]))
  np.testing.assert_array_equal(np.asarray(whole), out)


def test_micro_conditioned_sharded_non_square_matches_diffusers():
  _, config, ref, out = _forward(MS)
  assert config.model.micro_conditions and config.model.pos_interpolation_scale == 2.0
  assert ref["x"].shape[1:3] == (8, 12)  # positions rescaled to the trained 4x4 grid, as diffusers does
  np.testing.assert_allclose(out, ref["sample"], atol=1e-4, rtol=0)


def test_ddim_trajectory_matches_diffusers_scheduler():
  """10 DDIM steps with guidance 4.5 against a null caption, as PixArtAlphaPipeline with DDIMScheduler.

  A random network is no denoiser, so the trajectory grows to ~400 (x0 = x / sqrt(abar) at t = 900);
  float32 rounding grows with it: checked to 1e-4 relative to each step's scale.
  """
  model, _ = pixart.load(TINY)
  ref = np.load(os.path.join(TINY, "reference.npz"))
  np.testing.assert_array_equal(text_ddpm.diffusion(True, 10).timestep_map[::-1], ref["ddim_timesteps"])
  traj = text_ddpm.sample(model, jnp.asarray(ref["context"][:2]), jnp.asarray(ref["mask"][:2]), None,
                          image_shape=(8, 8, 4), num_steps=10, guidance_scale=float(ref["guidance_scale"]),
                          null_context=jnp.asarray(ref["null_context"]), null_mask=jnp.asarray(ref["null_mask"]),
                          x_T=jnp.asarray(ref["z"]), return_trajectory=True)
  traj = np.asarray(traj)
  assert traj.shape == ref["ddim_traj"].shape
  for step, (ours, theirs) in enumerate(zip(traj, ref["ddim_traj"])):
    scale = max(1.0, float(np.abs(theirs).max()))
    assert np.abs(ours - theirs).max() <= 1e-4 * scale, f"step {step}"


def _copy(folder, tmp_path):
  dst = tmp_path / "ckpt"
  shutil.copytree(folder, dst)
  return dst


def test_refuses_a_mis_shaped_tensor_naming_it(tmp_path):
  dst = _copy(TINY, tmp_path)
  file = dst / "diffusion_pytorch_model.safetensors"
  tensors = load_file(str(file))
  name = "transformer_blocks.1.attn2.to_k.weight"
  tensors[name] = np.zeros((32, 20), np.float32)
  save_file(tensors, str(file))
  with pytest.raises(mapping.CheckpointMismatch, match=r"transformer_blocks\.1\.attn2\.to_k.*\(32, 20\)"):
    pixart.load(str(dst))


def test_refuses_missing_and_unexpected_tensors(tmp_path):
  dst = _copy(TINY, tmp_path)
  file = dst / "diffusion_pytorch_model.safetensors"
  tensors = load_file(str(file))
  tensors["transformer_blocks.0.attn1.norm_q.weight"] = np.ones(16, np.float32)
  save_file(tensors, str(file))
  with pytest.raises(mapping.CheckpointMismatch, match=r"unexpected tensors.*attn1\.norm_q\.weight"):
    pixart.load(str(dst))
  del tensors["transformer_blocks.0.attn1.norm_q.weight"], tensors["scale_shift_table"]
  save_file(tensors, str(file))
  with pytest.raises(mapping.CheckpointMismatch, match=r"missing.*'scale_shift_table'"):
    pixart.load(str(dst))


def test_refuses_an_architecture_it_does_not_implement(tmp_path):
  dst = _copy(TINY, tmp_path)
  cfg = json.loads((dst / "config.json").read_text())
  cfg["activation_fn"] = "geglu"
  (dst / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(hf_checkpoint.CheckpointError, match="activation_fn='geglu'"):
    pixart.load(str(dst))


@pytest.mark.parametrize("resolution", [256, 1024])
def test_param_count_equals_pixart_alpha_xl2(resolution):
  config = load_config("pixart_alpha", str(resolution))
  tasks.validate(config)
  shapes = text_to_image.abstract_params(config)
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == PUBLISHED_PARAMS[resolution]


def test_pixart_options_are_validated():
  config = load_config("pixart_alpha", "256")
  config.model.prediction = "velocity"
  with pytest.raises(ValueError, match="model.learn_sigma"):
    tasks.validate(config)
  config = load_config("pixart_alpha", "512")
  config.model.conditioning = "adaln_zero"
  config.model.micro_conditions = True
  with pytest.raises(ValueError, match="model.micro_conditions"):
    tasks.validate(config)
  config = load_config("pixart_alpha", "256")
  config.sample.sampler = "euler"
  with pytest.raises(ValueError, match="sample.sampler"):
    tasks.validate(config)


@pytest.mark.parametrize("sample_size,resolution", [(32, 256), (64, 512), (128, 1024)])
def test_converted_config_is_the_configs_file(sample_size, resolution):
  """A converted hub checkpoint continues training with --config=configs/pixart_alpha.py:RES (same state fields)."""
  hub = {"_class_name": "PixArtTransformer2DModel", "num_attention_heads": 16, "attention_head_dim": 72,
         "in_channels": 4, "out_channels": 8, "num_layers": 28, "cross_attention_dim": 1152, "patch_size": 2,
         "sample_size": sample_size, "caption_channels": 4096, "norm_type": "ada_norm_single", "norm_eps": 1e-6,
         "activation_fn": "gelu-approximate", "attention_bias": True, "norm_elementwise_affine": False}
  converted = pixart.config_from_diffusers(hub)
  differences = schema.config_differences(load_config("pixart_alpha", str(resolution)).to_dict(), converted.to_dict())
  state, _ = schema.split_differences(differences)
  assert not state, state
