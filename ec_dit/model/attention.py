"""Multi-head self- and cross-attention with float32 softmax.

Cross-attention separates `text_kv` (keys and values of the text, computed once)
from the attention itself, so a sampler can cache the text K/V of every block
across denoising steps (Nucleus-Image's text KV cache).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ec_dit import primitives


class TextKV(NamedTuple):
  """Keys and values of the text tokens for one cross-attention: [B, L, N, H] each."""
  k: jax.Array
  v: jax.Array


def _split_heads(x: jax.Array, num_heads: int) -> jax.Array:
  b, t, d = x.shape
  return x.reshape(b, t, num_heads, d // num_heads)


def attend(q, k, v, mask=None):
  """Softmax attention. q [B, T, N, H], k/v [B, S, N, H], mask [B, S] bool (True = attend).

  Logits and softmax in float32. Rows whose keys are all masked (an empty
  prompt with no tokens) return zeros instead of NaN. The 1/sqrt(H) scale is
  applied to q ([B, T, N, H]) rather than to the logits ([B, N, T, S]): less
  memory traffic whenever S > H.
  """
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("btnh,bsnh->bnts", q * scale, k).astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask[:, None, None, :], logits, -1e30)
  weights = primitives.softmax(logits)
  if mask is not None:
    weights = weights * jnp.any(mask, axis=-1)[:, None, None, None]
  out = jnp.einsum("bnts,bsnh->btnh", weights.astype(v.dtype), v)
  return out.reshape(out.shape[0], out.shape[1], -1)


class SelfAttention(nnx.Module):
  """Multi-head self-attention over the image tokens."""

  def __init__(self, d: int, num_heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.num_heads = num_heads
    self.qkv = primitives.Linear(d, 3 * d, ("embed", "heads"), rngs=rngs, dtype=dtype)
    self.out = primitives.Linear(d, d, ("heads", "embed"), rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
    h = self.num_heads
    return self.out(attend(_split_heads(q, h), _split_heads(k, h), _split_heads(v, h)))


class CrossAttention(nnx.Module):
  """Image tokens (queries) attend to text tokens (keys/values) with a padding mask."""

  def __init__(self, d: int, num_heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.num_heads = num_heads
    self.q = primitives.Linear(d, d, ("embed", "heads"), rngs=rngs, dtype=dtype)
    self.kv = primitives.Linear(d, 2 * d, ("embed", "heads"), rngs=rngs, dtype=dtype)
    self.out = primitives.Linear(d, d, ("heads", "embed"), rngs=rngs, dtype=dtype)

  def text_kv(self, context: jax.Array) -> TextKV:
    """Keys and values of the (projected) text, reusable across denoising steps."""
    k, v = jnp.split(self.kv(context), 2, axis=-1)
    return TextKV(_split_heads(k, self.num_heads), _split_heads(v, self.num_heads))

  def __call__(self, x: jax.Array, kv: TextKV, mask: jax.Array) -> jax.Array:
    q = _split_heads(self.q(x), self.num_heads)
    return self.out(attend(q, kv.k, kv.v, mask))
