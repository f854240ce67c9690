"""The small trainable text encoder: token ids from `ec_dit.tokenizer` -> text features.

The `TextEncoder` is a small bidirectional transformer trained with the DiT. A
frozen pretrained encoder (T5) plugs in through the same contract: `(tokens, mask) -> features [B, L, D]` with `mask` [B, L], or its
features can be precomputed and fed to the DiT directly (`context=`).

The empty prompt has no tokens (an all-False mask): the DiT's cross-attention
then contributes exactly zero, which is the unconditional ("null") input that
classifier-free guidance uses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ec_dit import primitives
from ec_dit.model import attention


class _EncoderLayer(nnx.Module):
  def __init__(self, d: int, num_heads: int, *, rngs: nnx.Rngs, dtype):
    self.num_heads = num_heads
    self.qkv = primitives.Linear(d, 3 * d, ("embed", "heads"), rngs=rngs, dtype=dtype)
    # Residual branches start at zero, so a fresh encoder passes each token's own
    # embedding through: with random full-scale branches the (small) token identity
    # would drown in the attention average and the DiT would see no prompt at all.
    self.out = primitives.Linear(d, d, ("heads", "embed"), kernel_init=primitives.zeros_init, rngs=rngs, dtype=dtype)
    self.fc1 = primitives.Linear(d, 4 * d, ("embed", "mlp"), rngs=rngs, dtype=dtype)
    self.fc2 = primitives.Linear(4 * d, d, ("mlp", "embed"), kernel_init=primitives.zeros_init, rngs=rngs, dtype=dtype)

  def __call__(self, x, mask):
    b, length, d = x.shape
    q, k, v = (t.reshape(b, length, self.num_heads, d // self.num_heads)
               for t in jnp.split(self.qkv(primitives.layer_norm(x)), 3, axis=-1))
    x = x + self.out(attention.attend(q, k, v, mask))
    return x + self.fc2(primitives.gelu(self.fc1(primitives.layer_norm(x))))


class TextEncoder(nnx.Module):
  """Token ids [B, L] + mask -> features [B, L, width]: embeddings, learned positions,
  pre-LN bidirectional transformer layers, final LayerNorm. Padding stays masked."""

  def __init__(self, vocab_size: int, max_len: int, width: int, depth: int, num_heads: int, *,
               rngs: nnx.Rngs, dtype=jnp.float32):
    self.embed = primitives.param(rngs, nnx.initializers.normal(1.0), (vocab_size, width), ("vocab", "embed"))
    # Positions at the tokens' scale: word order is what binds an attribute to its noun
    # ("a red square and a blue circle" vs "a blue square and a red circle"). Positions
    # initialised small (std 0.02, as in BERT, whose tokens are small too) stayed small
    # through a whole tiny run: the encoder was nearly a bag of words (docs/tiny_recipe.md,
    # "Previous text positions").
    self.pos = primitives.param(rngs, nnx.initializers.normal(1.0), (max_len, width), ("unmodeled", "embed"))
    self.layers = nnx.List([_EncoderLayer(width, num_heads, rngs=rngs, dtype=dtype) for _ in range(depth)])
    self.dtype = dtype

  def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    x = (self.embed[...][tokens] + self.pos[...][None, : tokens.shape[1]]).astype(self.dtype)
    for layer in self.layers:
      x = layer(x, mask)
    return primitives.layer_norm(x) * mask[..., None].astype(self.dtype)
