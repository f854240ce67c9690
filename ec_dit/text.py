"""Text conditioning: a tokenizer for any Unicode string and a small trainable encoder.

The default is a word-level tokenizer that hashes each word into a fixed number
of buckets (no vocabulary file, no unknown token: any string tokenizes), or a
byte-level one. The `TextEncoder` is a small bidirectional transformer trained
with the DiT. A frozen pretrained encoder (T5) plugs in through the same
contract: `(tokens, mask) -> features [B, L, D]` with `mask` [B, L], or its
features can be precomputed and fed to the DiT directly (`context=`).

The empty prompt has no tokens (an all-False mask): the DiT's cross-attention
then contributes exactly zero, which is the unconditional ("null") input that
classifier-free guidance uses.
"""

from __future__ import annotations

import re
import warnings
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ec_dit import attention, nn

TOKENIZERS = ("words", "bytes")
_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


class Tokenizer:
  """Turns prompts into fixed-length token ids and a padding mask.

  kind="words": lower-cased words and punctuation, each hashed (CRC32 of its
    UTF-8 bytes) into `vocab_size - 1` buckets; id 0 is padding.
  kind="bytes": UTF-8 bytes, id = byte + 1; id 0 is padding.

  Prompts longer than `max_len` tokens are truncated with a warning.
  """

  def __init__(self, kind: str = "words", vocab_size: int = 4096, max_len: int = 16):
    if kind not in TOKENIZERS:
      raise ValueError(f"config.text.tokenizer: must be one of {TOKENIZERS}, got {kind!r}")
    if kind == "bytes" and vocab_size < 257:
      raise ValueError(f"config.text.vocab_size: must be >= 257 for byte tokens, got {vocab_size}")
    self.kind, self.vocab_size, self.max_len = kind, vocab_size, max_len

  def pieces(self, prompt: str) -> list[int]:
    if not isinstance(prompt, str):
      raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if self.kind == "bytes":
      return [b + 1 for b in prompt.encode("utf-8")]
    return [1 + zlib.crc32(w.encode("utf-8")) % (self.vocab_size - 1) for w in _WORD.findall(prompt.lower())]

  def encode(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
    """prompt -> (ids int32 [max_len], mask bool [max_len])."""
    ids = self.pieces(prompt)
    if len(ids) > self.max_len:
      warnings.warn(f"prompt has {len(ids)} tokens, more than max_len={self.max_len}; truncated: {prompt[:80]!r}",
                    stacklevel=2)
      ids = ids[: self.max_len]
    out = np.zeros((self.max_len,), np.int32)
    out[: len(ids)] = ids
    return out, out > 0

  def encode_batch(self, prompts) -> tuple[np.ndarray, np.ndarray]:
    pairs = [self.encode(p) for p in prompts]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def tokenizer_from_config(config) -> Tokenizer:
  return Tokenizer(config.text.tokenizer, config.text.vocab_size, config.model.context_len)


class _EncoderLayer(nnx.Module):
  def __init__(self, d: int, num_heads: int, *, rngs: nnx.Rngs, dtype):
    self.num_heads = num_heads
    self.qkv = nn.Linear(d, 3 * d, ("embed", "heads"), rngs=rngs, dtype=dtype)
    # Residual branches start at zero, so a fresh encoder passes each token's own
    # embedding through: with random full-scale branches the (small) token identity
    # would drown in the attention average and the DiT would see no prompt at all.
    self.out = nn.Linear(d, d, ("heads", "embed"), kernel_init=nn.zeros_init, rngs=rngs, dtype=dtype)
    self.fc1 = nn.Linear(d, 4 * d, ("embed", "mlp"), rngs=rngs, dtype=dtype)
    self.fc2 = nn.Linear(4 * d, d, ("mlp", "embed"), kernel_init=nn.zeros_init, rngs=rngs, dtype=dtype)

  def __call__(self, x, mask):
    b, length, d = x.shape
    q, k, v = (t.reshape(b, length, self.num_heads, d // self.num_heads)
               for t in jnp.split(self.qkv(nn.layer_norm(x)), 3, axis=-1))
    x = x + self.out(attention.attend(q, k, v, mask))
    return x + self.fc2(nn.gelu(self.fc1(nn.layer_norm(x))))


class TextEncoder(nnx.Module):
  """Token ids [B, L] + mask -> features [B, L, width]: embeddings, learned positions,
  pre-LN bidirectional transformer layers, final LayerNorm. Padding stays masked."""

  def __init__(self, vocab_size: int, max_len: int, width: int, depth: int, num_heads: int, *,
               rngs: nnx.Rngs, dtype=jnp.float32):
    self.embed = nn.param(rngs, nnx.initializers.normal(1.0), (vocab_size, width), ("vocab", "embed"))
    # Positions at the tokens' scale: word order is what binds an attribute to its noun
    # ("a red square and a blue circle" vs "a blue square and a red circle"). Positions
    # initialised small (std 0.02, as in BERT, whose tokens are small too) were still 4%
    # of a token's norm after a whole tiny run: the encoder was nearly a bag of words.
    self.pos = nn.param(rngs, nnx.initializers.normal(1.0), (max_len, width), ("unmodeled", "embed"))
    self.layers = nnx.List([_EncoderLayer(width, num_heads, rngs=rngs, dtype=dtype) for _ in range(depth)])
    self.dtype = dtype

  def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    x = (self.embed[...][tokens] + self.pos[...][None, : tokens.shape[1]]).astype(self.dtype)
    for layer in self.layers:
      x = layer(x, mask)
    return nn.layer_norm(x) * mask[..., None].astype(self.dtype)
