"""Tokenizers for any Unicode string: hashed words (the default) or UTF-8 bytes.

The word-level tokenizer hashes each word into a fixed number of buckets (no
vocabulary file, no unknown token: any string tokenizes). The empty prompt has
no tokens (an all-False mask): the DiT's cross-attention then contributes
exactly zero, which is the unconditional ("null") input of classifier-free
guidance.
"""

from __future__ import annotations

import re
import warnings
import zlib

import numpy as np

from ec_dit import schema

TOKENIZERS = schema.TOKENIZERS
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
