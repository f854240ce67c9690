"""T5 encoder and tokenizer: parity with transformers (committed fixtures), bf16, mesh placement."""

import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ec_dit import schema, sharding
from ec_dit.encoders import t5 as t5_lib
from ec_dit.encoders import T5Encoder, T5Tokenizer

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "encoders"


def _mesh(fsdp=4, tensor=2):
  config = schema.mesh_defaults()
  config.data, config.fsdp, config.tensor = 1, fsdp, tensor
  return sharding.make_mesh(config)


@pytest.mark.parametrize("name", ["t5_gated", "t5_relu"])
def test_t5_matches_transformers(name):
  """gated-gelu (T5EncoderModel file) and relu (a sharded T5ForConditionalGeneration): padded batches."""
  ref = np.load(FIXTURES / name / "reference.npz")
  model = T5Encoder.from_pretrained(FIXTURES / name)
  assert model.config.feed_forward_proj == ("gated-gelu" if name == "t5_gated" else "relu")
  assert ref["mask"].sum(1).tolist() == [20, 13, 5]
  out = np.asarray(t5_lib.encode_fn(model)(ref["ids"], ref["mask"]))
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, ref["features"], atol=1e-4, rtol=0)


def test_t5_padding_does_not_leak():
  """A prompt's features do not depend on what sits in the padding."""
  ref = np.load(FIXTURES / "t5_gated" / "reference.npz")
  model = T5Encoder.from_pretrained(FIXTURES / "t5_gated")
  ids, mask = ref["ids"].copy(), ref["mask"]
  ids[~mask] = 7
  encode = t5_lib.encode_fn(model)
  a, b = encode(ref["ids"], mask), encode(ids, mask)
  np.testing.assert_allclose(np.asarray(a)[mask], np.asarray(b)[mask], atol=1e-6)


def test_t5_bf16_option():
  ref = np.load(FIXTURES / "t5_gated" / "reference.npz")
  model = T5Encoder.from_pretrained(FIXTURES / "t5_gated", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert model.layers[0].attn.q.kernel[...].dtype == jnp.bfloat16
  out = model(ref["ids"], ref["mask"])
  assert out.dtype == jnp.bfloat16
  mask = ref["mask"]
  err = np.abs(np.asarray(out, np.float32) - ref["features"])[mask]
  assert err.mean() < 0.05 and np.isfinite(err).all()


def test_relative_position_buckets():
  b = np.asarray(t5_lib.relative_position_buckets(40, 32, 128))
  assert b[0, 0] == 0 and b[5, 6] == 16 + 1 and b[6, 5] == 1  # keys after the query use the upper half
  assert b.min() >= 0 and b.max() < 32
  assert b[0, 39] > b[0, 20] > b[0, 8]  # log buckets grow with the distance


def test_t5_on_mesh_matches_one_device_and_is_sharded():
  ref = np.load(FIXTURES / "t5_gated" / "reference.npz")
  ids, mask = np.concatenate([ref["ids"], ref["ids"][:1]]), np.concatenate([ref["mask"], ref["mask"][:1]])
  single = np.asarray(t5_lib.encode_fn(T5Encoder.from_pretrained(FIXTURES / "t5_gated"))(ids, mask))
  mesh = _mesh()
  model = T5Encoder.from_pretrained(FIXTURES / "t5_gated", mesh=mesh)
  layer = model.layers[1]
  assert layer.attn.q.kernel[...].sharding.spec == P("fsdp", "tensor")
  assert layer.attn.o.kernel[...].sharding.spec == P("tensor", "fsdp")
  assert layer.ffn.wi_0.kernel[...].sharding.spec == P("fsdp", "tensor")
  assert layer.ffn.wo.kernel[...].sharding.spec == P("tensor", "fsdp")
  assert model.embed[...].sharding.spec == P(None, "fsdp")
  assert model.relative_attention_bias[...].sharding.spec == P(None, "tensor")
  assert layer.attn_norm[...].sharding.spec == P("fsdp")
  # Each device holds only its block.
  q = layer.attn.q.kernel[...]
  assert {s.data.shape for s in q.addressable_shards} == {(32 // 4, 32 // 2)}
  batch = sharding.batch_sharding(mesh, sharding.DEFAULT_RULES, ids.shape[0], 2)
  out = t5_lib.encode_fn(model)(jax.device_put(ids, batch), jax.device_put(mask, batch))
  np.testing.assert_allclose(np.asarray(out), single, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------
# Tokenizer


@pytest.fixture(params=["spiece.model", "tokenizer.json"])
def tokenizer_folder(request, tmp_path):
  (tmp_path / request.param).write_bytes((FIXTURES / "tokenizer" / request.param).read_bytes())
  return tmp_path


def test_tokenizer_matches_reference(tokenizer_folder):
  """Both formats give transformers' ids: EOS appended, padded to 16, truncated keeping the EOS."""
  ref = np.load(FIXTURES / "tokenizer" / "reference.npz")
  tok = T5Tokenizer.from_pretrained(tokenizer_folder, context_len=16)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ids, mask = tok([str(p) for p in ref["prompts"]])
  np.testing.assert_array_equal(ids, ref["ids"])
  np.testing.assert_array_equal(mask, ref["mask"])
  assert len(caught) == 2 and all("truncated" in str(w.message) for w in caught)  # the two long prompts


def test_tokenizer_contract(tokenizer_folder):
  tok = T5Tokenizer.from_pretrained(tokenizer_folder, context_len=12)
  assert tok.eos_id == 1 and tok.pad_id == 0
  ids, mask = tok.encode("a photo of a cat")
  n = int(mask.sum())
  assert ids.shape == mask.shape == (12,) and ids.dtype == np.int32 and mask.dtype == bool
  assert ids[n - 1] == tok.eos_id and (ids[n:] == tok.pad_id).all() and mask[:n].all()
  assert tok.decode(ids, mask) == "a photo of a cat"
  empty, empty_mask = tok.encode("")
  assert empty[0] == tok.eos_id and empty_mask.tolist() == [True] + [False] * 11
  for text in ["日本語のテキスト", "emoji 🐱🚀", "\x00\ufffd\u200b", "Ω≈ç√∫", "e\u0301"]:
    ids, mask = tok.encode(text)
    assert mask.any() and ids[mask.sum() - 1] == tok.eos_id
  with pytest.warns(UserWarning, match="truncated"):
    ids, mask = tok.encode("two dogs " * 20)
  assert mask.all() and ids[-1] == tok.eos_id
  with pytest.raises(TypeError):
    tok.encode(3)


def test_tokenizer_subfolder_and_missing(tmp_path):
  (tmp_path / "tokenizer").mkdir()
  (tmp_path / "tokenizer" / "spiece.model").write_bytes((FIXTURES / "tokenizer" / "spiece.model").read_bytes())
  assert T5Tokenizer.from_pretrained(tmp_path).context_len == 120
  with pytest.raises(FileNotFoundError, match="spiece.model or tokenizer.json"):
    T5Tokenizer.from_pretrained(FIXTURES / "vae4")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    T5Tokenizer.from_pretrained(tmp_path / "nowhere")
