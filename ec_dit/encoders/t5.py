"""The T5 encoder (v1.1 / Flan-T5 and the original T5) in Flax NNX, loading Hugging Face checkpoints.

T5's encoder: token embeddings (not scaled), then `num_layers` pre-norm blocks
of self-attention and a feed-forward network, then a final norm. The norm is
RMS (no mean, no bias); attention is unscaled (no 1/sqrt(d)), with a learned
bias per head from bidirectional relative-position buckets, whose table lives
in the first block and is shared by all. The feed-forward is gated GELU (tanh
approximation, v1.1) or ReLU (original T5), chosen by `feed_forward_proj`.
Nothing has a bias. Padding is masked out of attention; the features at padded
positions are whatever the reference computes there (the DiT masks them).

Parameters carry logical axes (`embed`, `heads`, `mlp`, `vocab`), so
`ec_dit.sharding` rules shard T5-XXL like the DiT.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from ec_dit import primitives, sharding
from ec_dit.encoders import hf_checkpoint as hf

_ACTIVATIONS = ("relu", "gelu", "silu")
_MODEL_TYPES = ("t5", "mt5")


@dataclasses.dataclass(frozen=True)
class T5Config:
  """The encoder's shape, as in a transformers `config.json` (`T5Config.from_dict` reads one)."""
  vocab_size: int = 32128
  d_model: int = 768
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 12
  num_heads: int = 12
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "gated-gelu"

  @property
  def gated(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  @property
  def activation(self) -> str:
    return self.feed_forward_proj.split("-")[-1]

  @classmethod
  def from_dict(cls, cfg: dict) -> "T5Config":
    """From a parsed config.json; raises CheckpointError for architectures this encoder does not implement."""
    model_type = cfg.get("model_type", "t5")
    if model_type not in _MODEL_TYPES:
      raise hf.unsupported("model_type", model_type, _MODEL_TYPES)
    proj = cfg.get("feed_forward_proj", "relu")
    parts = proj.split("-")
    if not (len(parts) == 1 and parts[0] in _ACTIVATIONS or
            len(parts) == 2 and parts[0] == "gated" and parts[1] in _ACTIVATIONS):
      raise hf.unsupported("feed_forward_proj", proj, "relu, gelu, silu, or gated-<one of those>")
    return cls(**hf.config_fields(cls, cfg))

  @classmethod
  def v1_1(cls, size: str) -> "T5Config":
    """T5-v1.1 shapes by name: small, base, large, xl, xxl."""
    shapes = dict(small=(512, 1024, 8, 6), base=(768, 2048, 12, 12), large=(1024, 2816, 24, 16),
                  xl=(2048, 5120, 24, 32), xxl=(4096, 10240, 24, 64))
    d_model, d_ff, layers, heads = shapes[size]
    return cls(d_model=d_model, d_ff=d_ff, num_layers=layers, num_heads=heads)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> jax.Array:
  """[length, length] bucket ids of key - query offsets, bidirectional, as in T5.

  Half the buckets are for keys after the query; within each half, offsets
  below a quarter of the buckets get one bucket each, larger ones share
  logarithmically spaced buckets up to `max_distance`.
  """
  pos = jnp.arange(length)
  rel = pos[None, :] - pos[:, None]
  half = num_buckets // 2
  buckets = (rel > 0).astype(jnp.int32) * half
  rel = jnp.abs(rel)
  exact = half // 2
  # Clamp before the log: the value is discarded where rel < exact, and log(0) would warn.
  large = exact + (jnp.log(jnp.maximum(rel, 1).astype(jnp.float32) / exact) /
                   math.log(max_distance / exact) * (half - exact)).astype(jnp.int32)
  large = jnp.minimum(large, half - 1)
  return buckets + jnp.where(rel < exact, rel, large)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """T5's norm: x / sqrt(mean(x^2) + eps) * scale, computed in float32, returned in x's dtype."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return (y.astype(scale.dtype) * scale).astype(x.dtype)


def _activation(name: str, gated: bool):
  if name == "gelu":
    return lambda x: jax.nn.gelu(x, approximate=gated)  # transformers: gated-gelu is "gelu_new" (tanh)
  return jax.nn.relu if name == "relu" else jax.nn.silu


class _Attention(nnx.Module):
  def __init__(self, c: T5Config, *, rngs: nnx.Rngs, dtype, param_dtype):
    inner = c.num_heads * c.d_kv
    kw = dict(rngs=rngs, use_bias=False, dtype=dtype, param_dtype=param_dtype)
    self.q = primitives.Linear(c.d_model, inner, ("embed", "heads"), **kw)
    self.k = primitives.Linear(c.d_model, inner, ("embed", "heads"), **kw)
    self.v = primitives.Linear(c.d_model, inner, ("embed", "heads"), **kw)
    self.o = primitives.Linear(inner, c.d_model, ("heads", "embed"), **kw)
    self.num_heads, self.d_kv = c.num_heads, c.d_kv

  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    b, length, _ = x.shape
    q, k, v = (t(x).reshape(b, length, self.num_heads, self.d_kv) for t in (self.q, self.k, self.v))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, length, self.num_heads * self.d_kv)
    return self.o(out)


class _FeedForward(nnx.Module):
  def __init__(self, c: T5Config, *, rngs: nnx.Rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, use_bias=False, dtype=dtype, param_dtype=param_dtype)
    if c.gated:
      self.wi_0 = primitives.Linear(c.d_model, c.d_ff, ("embed", "mlp"), **kw)
      self.wi_1 = primitives.Linear(c.d_model, c.d_ff, ("embed", "mlp"), **kw)
    else:
      self.wi = primitives.Linear(c.d_model, c.d_ff, ("embed", "mlp"), **kw)
    self.wo = primitives.Linear(c.d_ff, c.d_model, ("mlp", "embed"), **kw)
    self.gated, self.act = c.gated, _activation(c.activation, c.gated)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
    return self.wo(h)


class _Block(nnx.Module):
  def __init__(self, c: T5Config, *, rngs: nnx.Rngs, dtype, param_dtype):
    ones = nnx.initializers.ones_init()
    self.attn_norm = primitives.param(rngs, ones, (c.d_model,), ("embed",), param_dtype)
    self.attn = _Attention(c, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.ffn_norm = primitives.param(rngs, ones, (c.d_model,), ("embed",), param_dtype)
    self.ffn = _FeedForward(c, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.eps = c.layer_norm_epsilon

  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    x = x + self.attn(rms_norm(x, self.attn_norm[...], self.eps), bias)
    return x + self.ffn(rms_norm(x, self.ffn_norm[...], self.eps))


class T5Encoder(nnx.Module):
  """T5 encoder: token ids [B, L] and mask [B, L] -> features [B, L, d_model] in `dtype`.

  `dtype` is the compute dtype (float32 or bfloat16; norms and softmax run in
  float32 either way), `param_dtype` the parameters' storage dtype.
  """

  def __init__(self, config: T5Config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    c = self.config = config
    self.embed = primitives.param(rngs, nnx.initializers.normal(1.0), (c.vocab_size, c.d_model), ("vocab", "embed"),
                          param_dtype)
    self.relative_attention_bias = primitives.param(rngs, nnx.initializers.normal(1.0),
                                            (c.relative_attention_num_buckets, c.num_heads),
                                            ("unmodeled", "heads"), param_dtype)
    self.layers = nnx.List([_Block(c, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                            for _ in range(c.num_layers)])
    self.final_norm = primitives.param(rngs, nnx.initializers.ones_init(), (c.d_model,), ("embed",), param_dtype)
    self.dtype = dtype

  def position_bias(self, length: int) -> jax.Array:
    """[1, heads, L, L] float32 attention bias from the shared relative-position table."""
    c = self.config
    buckets = relative_position_buckets(length, c.relative_attention_num_buckets, c.relative_attention_max_distance)
    table = self.relative_attention_bias[...].astype(jnp.float32)
    return jnp.transpose(table[buckets], (2, 0, 1))[None]

  def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)
    # Additive mask as in transformers (the dtype's most negative value, not -inf):
    # a row with no valid key stays finite.
    neg = jnp.finfo(jnp.float32).min
    bias = self.position_bias(tokens.shape[1]) + jnp.where(mask[:, None, None, :], 0.0, neg)
    for layer in self.layers:
      x = layer(x, bias)
    return rms_norm(x, self.final_norm[...], self.config.layer_norm_epsilon)

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=jnp.float32,
                      mesh: Mesh | None = None, rules=sharding.DEFAULT_RULES) -> "T5Encoder":
    """Loads a local Hugging Face T5 folder (config.json + model.safetensors or shards).

    Checkpoints of `T5EncoderModel`, `T5Model` and `T5ForConditionalGeneration`
    all load (decoder and LM head tensors are skipped); a diffusers pipeline
    folder loads from its `text_encoder/`. With `mesh`, each parameter is read
    straight into its sharding by `rules`.
    """
    return hf.load_pretrained(cls, T5Config, path, subfolder="text_encoder", stems=("model",),
                              sources=lambda abstract: checkpoint_sources(abstract.config), ignore=_not_encoder,
                              dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules)


def _not_encoder(name: str) -> bool:
  return name.startswith(("decoder.", "lm_head."))


def checkpoint_sources(c: T5Config) -> dict[str, hf.Source]:
  """Parameter path -> the transformers tensor it is read from."""
  linear = lambda name: hf.Source((name,), hf.LINEAR)
  out = {
      "embed": hf.Source(("shared.weight", "encoder.embed_tokens.weight")),
      "relative_attention_bias": hf.Source(("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",)),
      "final_norm": hf.Source(("encoder.final_layer_norm.weight",)),
  }
  ffn = ("wi_0", "wi_1", "wo") if c.gated else ("wi", "wo")
  for i in range(c.num_layers):
    pre = f"encoder.block.{i}.layer"
    out[f"layers.{i}.attn_norm"] = hf.Source((f"{pre}.0.layer_norm.weight",))
    out[f"layers.{i}.ffn_norm"] = hf.Source((f"{pre}.1.layer_norm.weight",))
    for name in ("q", "k", "v", "o"):
      out[f"layers.{i}.attn.{name}.kernel"] = linear(f"{pre}.0.SelfAttention.{name}.weight")
    for name in ffn:
      out[f"layers.{i}.ffn.{name}.kernel"] = linear(f"{pre}.1.DenseReluDense.{name}.weight")
  return out


def encode_fn(model: T5Encoder):
  """A jitted `(tokens, mask) -> features` over the model's current parameters (placed as they are)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, tokens, mask):
    return nnx.merge(graphdef, state)(tokens, mask)

  return lambda tokens, mask: run(state, tokens, mask)
