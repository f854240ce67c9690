"""The SD VAE: parity with diffusers (committed fixtures), both attention name styles, chunked
jitted encode/decode, bf16, mesh placement."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from ec_dit import schema, sharding
from ec_dit.encoders import AutoencoderKL, CheckpointError

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "encoders"
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _copy(tmp_path, name, edit=None, config_edit=None) -> pathlib.Path:
  folder = tmp_path / name
  folder.mkdir()
  tensors = load_file(FIXTURES / name / WEIGHTS)
  config = json.loads((FIXTURES / name / "config.json").read_text())
  if edit:
    tensors = edit(tensors)
  if config_edit:
    config_edit(config)
  save_file(tensors, folder / WEIGHTS)
  (folder / "config.json").write_text(json.dumps(config))
  return folder


def _check_parity(vae, ref):
  mean, logvar = vae.encode(ref["images"])
  np.testing.assert_allclose(mean, ref["mean"], atol=1e-4, rtol=0)
  np.testing.assert_allclose(logvar, ref["logvar"], atol=1e-4, rtol=0)
  np.testing.assert_allclose(vae.decode(ref["latents"]), ref["decoded"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["vae4", "vae16"])
def test_vae_matches_diffusers(name):
  """vae4: 4 channels, quant convs, new attention names. vae16: 16 channels, shift, no quant convs, old names."""
  vae = AutoencoderKL.from_pretrained(FIXTURES / name)
  c = vae.config
  if name == "vae4":
    assert (c.latent_channels, c.scaling_factor, c.shift_factor) == (4, 0.18215, None)
    assert vae.quant_conv is not None and vae.post_quant_conv is not None
  else:
    assert (c.latent_channels, c.scaling_factor, c.shift_factor) == (16, 0.3611, 0.1159)
    assert vae.quant_conv is None and vae.post_quant_conv is None
    assert any(".attentions.0.query." in k for k in load_file(FIXTURES / name / WEIGHTS))
  _check_parity(vae, np.load(FIXTURES / name / "reference.npz"))


@pytest.mark.parametrize("name,to_old", [("vae4", True), ("vae16", False)])
def test_vae_other_attention_name_style(tmp_path, name, to_old):
  """The same weights under the other naming (old query/key/value/proj_attn <-> new to_q/.../to_out.0)."""
  pairs = [("to_q.", "query."), ("to_k.", "key."), ("to_v.", "value."), ("to_out.0.", "proj_attn.")]

  def rename(tensors):
    out = {}
    for key, value in tensors.items():
      for new, old in pairs:
        a, b = (new, old) if to_old else (old, new)
        key = key.replace(f"attentions.0.{a}", f"attentions.0.{b}")
      out[key] = value
    return out

  folder = _copy(tmp_path, name, edit=rename)
  marker = "attentions.0.proj_attn.weight" if to_old else "attentions.0.to_out.0.weight"
  assert any(k.endswith(marker) for k in load_file(folder / WEIGHTS))
  _check_parity(AutoencoderKL.from_pretrained(folder), np.load(FIXTURES / name / "reference.npz"))


def test_vae_chunked_latents_and_images():
  """latents_from_images / images_from_latents: scaled and shifted, jitted, in chunks (the last one padded)."""
  ref = np.load(FIXTURES / "vae16" / "reference.npz")
  vae = AutoencoderKL.from_pretrained(FIXTURES / "vae16")
  shift, scale = 0.1159, 0.3611
  images = np.concatenate([ref["images"], ref["images"], ref["images"][:1]])  # 5 images in chunks of 2
  latents = vae.latents_from_images(images, batch_size=2)
  assert isinstance(latents, np.ndarray) and latents.shape == (5, 4, 4, 16)
  want = (ref["mean"] - shift) * scale
  np.testing.assert_allclose(latents, np.concatenate([want, want, want[:1]]), atol=1e-5, rtol=0)
  z = np.concatenate([ref["latents"]] * 2 + [ref["latents"][:1]])
  decoded = vae.images_from_latents((z - shift) * scale, batch_size=2)
  np.testing.assert_allclose(decoded, np.concatenate([ref["decoded"]] * 2 + [ref["decoded"][:1]]), atol=1e-4, rtol=0)
  sampled = vae.latents_from_images(images, batch_size=2, rng=jax.random.key(0))
  assert sampled.shape == latents.shape and not np.allclose(sampled, latents)
  noise = (sampled - latents) / scale / np.exp(0.5 * np.concatenate([ref["logvar"]] * 2 + [ref["logvar"][:1]]))
  assert 0.7 < noise.std() < 1.3  # mean + std * N(0, 1)
  np.testing.assert_array_equal(sampled, vae.latents_from_images(images, batch_size=2, rng=jax.random.key(0)))


def test_vae_without_mid_attention(tmp_path):
  folder = _copy(tmp_path, "vae4", edit=lambda t: {k: v for k, v in t.items() if ".attentions." not in k},
                 config_edit=lambda c: c.update(mid_block_add_attention=False))
  vae = AutoencoderKL.from_pretrained(folder)
  assert vae.encoder.mid_block.attention is None and vae.decoder.mid_block.attention is None
  x = np.ones((1, 2, 2, 16), np.float32)
  np.testing.assert_allclose(vae.decoder.mid_block(x), vae.decoder.mid_block.resnets[1](vae.decoder.mid_block.resnets[0](x)))


def test_vae_errors(tmp_path):
  folder = _copy(tmp_path, "vae4", config_edit=lambda c: c.update(down_block_types=["AttnDownEncoderBlock2D"] * 2))
  with pytest.raises(CheckpointError, match="unsupported architecture field down_block_types='AttnDownEncoderBlock2D'"):
    AutoencoderKL.from_pretrained(folder)
  folder = _copy(tmp_path, "vae16", config_edit=lambda c: c.update(latent_channels=8))
  with pytest.raises(CheckpointError, match=r"shape mismatch for 'decoder\.conv_in\.weight' \(parameter decoder\.conv_in\.kernel\): "
                                            r"checkpoint gives \(3, 3, 16, 16\).*expects \(3, 3, 8, 16\)"):
    AutoencoderKL.from_pretrained(folder)


def test_vae_bf16_option():
  ref = np.load(FIXTURES / "vae4" / "reference.npz")
  vae = AutoencoderKL.from_pretrained(FIXTURES / "vae4", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert vae.encoder.conv_in.kernel[...].dtype == jnp.bfloat16
  mean, _ = vae.encode(ref["images"])
  assert mean.dtype == jnp.float32 and np.abs(np.asarray(mean) - ref["mean"]).mean() < 0.05


def test_vae_on_mesh_matches_one_device_and_is_sharded():
  ref = np.load(FIXTURES / "vae4" / "reference.npz")
  images = np.concatenate([ref["images"], ref["images"][:, ::-1]])  # 4 images: one per fsdp shard
  single = AutoencoderKL.from_pretrained(FIXTURES / "vae4")
  config = schema.mesh_defaults()
  config.data, config.fsdp, config.tensor = 1, 4, 2
  mesh = sharding.make_mesh(config)
  vae = AutoencoderKL.from_pretrained(FIXTURES / "vae4", mesh=mesh)
  enc = vae.encoder
  assert enc.conv_in.kernel[...].sharding.spec == P(None, None, None, "fsdp")  # 3 input channels: out split
  assert enc.down_blocks[1].resnets[0].conv1.kernel[...].sharding.spec == P(None, None, "fsdp")
  assert enc.mid_block.attention.to_q.kernel[...].sharding.spec == P("fsdp")
  assert enc.mid_block.attention.group_norm.scale[...].sharding.spec == P("fsdp")
  assert vae.decoder.conv_out.bias[...].sharding.spec == P()  # 3 channels: replicated
  kernel = enc.down_blocks[1].resnets[0].conv1.kernel[...]
  assert {s.data.shape for s in kernel.addressable_shards} == {(3, 3, 2, 16)}
  want = single.latents_from_images(images, batch_size=4)
  got = vae.latents_from_images(images, batch_size=4, mesh=mesh)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  np.testing.assert_allclose(vae.images_from_latents(want, batch_size=4, mesh=mesh),
                             single.images_from_latents(want, batch_size=4), atol=1e-5, rtol=0)
