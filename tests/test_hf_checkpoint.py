"""Checkpoint loading: sharded files, bf16 files, and an error naming each kind of mismatch."""

import json
import pathlib
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ec_dit import schema, sharding
from ec_dit.encoders import hf_checkpoint as hf
from ec_dit.encoders import AutoencoderKL, CheckpointError, T5Encoder, T5Tokenizer

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "encoders"


def _single_file_copy(tmp_path, edit=None, config_edit=None) -> pathlib.Path:
  """t5_gated copied to tmp_path, its tensors (a dict) and config.json (a dict) edited in place."""
  folder = tmp_path / "t5"
  folder.mkdir()
  tensors = load_file(FIXTURES / "t5_gated" / "model.safetensors")
  config = json.loads((FIXTURES / "t5_gated" / "config.json").read_text())
  if edit:
    edit(tensors)
  if config_edit:
    config_edit(config)
  save_file(tensors, folder / "model.safetensors")
  (folder / "config.json").write_text(json.dumps(config))
  return folder


def test_sharded_checkpoint_loads():
  folder = FIXTURES / "t5_relu"
  index = json.loads((folder / "model.safetensors.index.json").read_text())
  assert sorted(set(index["weight_map"].values())) == ["model-00001-of-00002.safetensors",
                                                       "model-00002-of-00002.safetensors"]
  assert not (folder / "model.safetensors").exists()
  assert any(k.startswith("decoder.") for k in index["weight_map"])  # a full T5: decoder skipped
  reader = hf.open_weights(folder, ("model",))
  assert set(reader.names()) == set(index["weight_map"])
  model = T5Encoder.from_pretrained(folder)
  assert len(model.layers) == 2


def test_bf16_checkpoint_loads(tmp_path):
  folder = _single_file_copy(tmp_path, edit=lambda t: t.update({k: v.astype(ml_dtypes.bfloat16)
                                                                for k, v in t.items()}))
  model = T5Encoder.from_pretrained(folder)
  ref = T5Encoder.from_pretrained(FIXTURES / "t5_gated")
  kernel = model.layers[0].ffn.wi_1.kernel[...]
  assert kernel.dtype == jnp.float32  # cast to the module's parameter dtype
  np.testing.assert_allclose(kernel, ref.layers[0].ffn.wi_1.kernel[...], rtol=1e-2, atol=1e-3)
  bf16 = T5Encoder.from_pretrained(folder, param_dtype=jnp.bfloat16)
  assert bf16.embed[...].dtype == jnp.bfloat16


def test_missing_keys(tmp_path):
  def drop(t):
    for k in [k for k in t if k.startswith("encoder.block.1.")]:
      del t[k]
  folder = _single_file_copy(tmp_path, edit=drop)
  with pytest.raises(CheckpointError, match=r"missing keys 9: \[.*encoder\.block\.1\..*\(4 more\)") as e:
    T5Encoder.from_pretrained(folder)
  assert "unexpected" not in str(e.value)


def test_unexpected_keys(tmp_path):
  folder = _single_file_copy(tmp_path, edit=lambda t: t.update(
      {"encoder.block.2.layer.0.SelfAttention.q.weight": np.zeros((32, 32), np.float32),
       "encoder.extra.weight": np.zeros((3,), np.float32)}))
  with pytest.raises(CheckpointError, match=r"unexpected keys 2: \['encoder\.block\.2\..*'encoder\.extra\.weight'\]"):
    T5Encoder.from_pretrained(folder)


def test_shape_mismatch(tmp_path):
  folder = _single_file_copy(tmp_path, config_edit=lambda c: c.update(d_ff=40))
  with pytest.raises(CheckpointError, match=r"shape mismatch for 'encoder\.block\.0\.layer\.1\.DenseReluDense\.wi_0"
                                            r"\.weight' \(parameter layers\.0\.ffn\.wi_0\.kernel\): checkpoint gives "
                                            r"\(32, 48\).*\(48, 32\) in the file.*expects \(32, 40\)"):
    T5Encoder.from_pretrained(folder)


def test_unsupported_architecture(tmp_path):
  folder = _single_file_copy(tmp_path, config_edit=lambda c: c.update(feed_forward_proj="gated-swish"))
  with pytest.raises(CheckpointError, match="unsupported architecture field feed_forward_proj='gated-swish'"):
    T5Encoder.from_pretrained(folder)
  shutil.rmtree(folder)
  folder = _single_file_copy(tmp_path, config_edit=lambda c: c.update(model_type="umt5"))
  with pytest.raises(CheckpointError, match="model_type='umt5'"):
    T5Encoder.from_pretrained(folder)


def test_missing_folder_and_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    T5Encoder.from_pretrained(tmp_path / "absent")
  with pytest.raises(FileNotFoundError, match="no config.json"):
    T5Encoder.from_pretrained(tmp_path)
  (tmp_path / "config.json").write_text((FIXTURES / "t5_gated" / "config.json").read_text())
  with pytest.raises(FileNotFoundError, match=r"no weights in .*model\.safetensors"):
    T5Encoder.from_pretrained(tmp_path)
  shard_index = {"weight_map": {"shared.weight": "model-00001-of-00002.safetensors"}}
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(shard_index))
  with pytest.raises(FileNotFoundError, match="lists shards that are not in the folder"):
    T5Encoder.from_pretrained(tmp_path)


def test_pytorch_bin_without_torch_says_how_to_convert(tmp_path):
  try:
    import torch  # noqa: F401
    pytest.skip("torch is installed: .bin files load")
  except ImportError:
    pass
  (tmp_path / "config.json").write_text((FIXTURES / "t5_gated" / "config.json").read_text())
  (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(CheckpointError, match=r"need torch.*without running code.*torch_pickle\.load\(.pytorch_model\.bin.\)"):
    T5Encoder.from_pretrained(tmp_path)


def test_diffusers_pipeline_folder(tmp_path):
  """A pipeline folder (PixArt-alpha's layout): text_encoder/, tokenizer/ and vae/ found from its root."""
  shutil.copytree(FIXTURES / "t5_gated", tmp_path / "text_encoder")
  shutil.copytree(FIXTURES / "vae4", tmp_path / "vae")
  (tmp_path / "tokenizer").mkdir()
  shutil.copy(FIXTURES / "tokenizer" / "spiece.model", tmp_path / "tokenizer")
  assert T5Encoder.from_pretrained(tmp_path).config.d_model == 32
  assert AutoencoderKL.from_pretrained(tmp_path).config.latent_channels == 4
  assert T5Tokenizer.from_pretrained(tmp_path).eos_id == 1


def test_mesh_loading_reads_only_each_devices_block(monkeypatch):
  """On a mesh no tensor that is sharded is ever read whole: each device reads its block from the file."""
  reads = []
  original = hf.Reader.read

  def spy(self, name, index=None):
    out = original(self, name, index)
    reads.append((name, out.shape, self.shape(name)))
    return out

  monkeypatch.setattr(hf.Reader, "read", spy)
  config = schema.mesh_defaults()
  config.data, config.fsdp, config.tensor = 1, 4, 2
  T5Encoder.from_pretrained(FIXTURES / "t5_gated", mesh=sharding.make_mesh(config))
  q = [(got, full) for name, got, full in reads if name == "encoder.block.0.layer.0.SelfAttention.q.weight"]
  assert len(q) == 8 and all(got == (16, 8) and full == (32, 32) for got, full in q)  # [out/2, in/4] each
  embed = [got for name, got, _ in reads if name == "shared.weight"]
  assert embed and all(got == (96, 8) for got in embed)
