"""The T5 tokenizer from a checkpoint folder: `spiece.model` (sentencepiece) or `tokenizer.json` (tokenizers).

Each prompt becomes its pieces plus EOS, padded with the pad id to
`context_len`, with a mask that is True on the real tokens (EOS included).
Longer prompts keep their first `context_len - 1` pieces and the EOS, with a
warning. Any Unicode string is accepted: characters outside the vocabulary
become the unknown piece.
"""

from __future__ import annotations

import os
import warnings
from typing import Sequence

import numpy as np
import sentencepiece
import tokenizers

from ec_dit.encoders import hf_checkpoint as hf


class _SentencePiece:
  def __init__(self, file: str):
    self._sp = sentencepiece.SentencePieceProcessor(model_file=file)
    self.eos_id, self.pad_id = self._sp.eos_id(), max(self._sp.pad_id(), 0)
    if self.eos_id < 0:
      raise hf.CheckpointError(f"{file}: the sentencepiece model has no EOS piece, this is not a T5 tokenizer")

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text, out_type=int)

  def decode(self, ids: list[int]) -> str:
    return self._sp.decode(ids)


class _HFTokenizers:
  def __init__(self, file: str):
    self._tok = tokenizers.Tokenizer.from_file(file)
    self.eos_id = self._tok.token_to_id("</s>")
    pad = self._tok.token_to_id("<pad>")
    self.pad_id = 0 if pad is None else pad
    if self.eos_id is None:
      raise hf.CheckpointError(f"{file}: no '</s>' token, this is not a T5 tokenizer")

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids  # EOS is appended by T5Tokenizer itself

  def decode(self, ids: list[int]) -> str:
    return self._tok.decode(ids)


class T5Tokenizer:
  """Prompts -> (token ids int32 [B, context_len], mask bool [B, context_len]).

  `T5Tokenizer.from_pretrained(folder)` uses `spiece.model` if present, else
  `tokenizer.json`. Also looks in a `tokenizer/` subfolder (diffusers layout).
  """

  def __init__(self, backend, context_len: int = 120):
    if context_len < 1:
      raise ValueError(f"context_len must be >= 1, got {context_len}")
    self._backend, self.context_len = backend, context_len
    self.eos_id, self.pad_id = backend.eos_id, backend.pad_id

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike, context_len: int = 120) -> "T5Tokenizer":
    """The tokenizer of a local checkpoint folder (nothing downloads)."""
    folder = hf.require_folder(path)
    for where in (folder, os.path.join(folder, "tokenizer")):
      spiece, tok_json = os.path.join(where, "spiece.model"), os.path.join(where, "tokenizer.json")
      if os.path.isfile(spiece):
        return cls(_SentencePiece(spiece), context_len)
      if os.path.isfile(tok_json):
        return cls(_HFTokenizers(tok_json), context_len)
    raise FileNotFoundError(f"no spiece.model or tokenizer.json in {folder!r} (or its tokenizer/ subfolder); "
                            f"found: {sorted(os.listdir(folder))}")

  def pieces(self, prompt: str) -> list[int]:
    """The prompt's ids without EOS or padding."""
    if not isinstance(prompt, str):
      raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    return list(self._backend.encode(prompt))

  def encode(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
    """One prompt -> (ids int32 [context_len], mask bool [context_len])."""
    ids = self.pieces(prompt)
    if len(ids) + 1 > self.context_len:
      warnings.warn(f"prompt has {len(ids) + 1} tokens with EOS, more than context_len={self.context_len}; "
                    f"truncated: {prompt[:80]!r}", stacklevel=2)
      ids = ids[: self.context_len - 1]
    ids = ids + [self.eos_id]
    out = np.full((self.context_len,), self.pad_id, np.int32)
    out[: len(ids)] = ids
    mask = np.zeros((self.context_len,), bool)
    mask[: len(ids)] = True
    return out, mask

  def __call__(self, prompts: Sequence[str] | str) -> tuple[np.ndarray, np.ndarray]:
    """A batch of prompts (or one) -> (ids [B, context_len], mask [B, context_len])."""
    if isinstance(prompts, str):
      prompts = [prompts]
    pairs = [self.encode(p) for p in prompts]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

  def decode(self, ids, mask=None) -> str:
    """Ids (up to the mask, without EOS) back to text."""
    ids = [int(i) for i, m in zip(ids, mask if mask is not None else [True] * len(ids)) if m]
    return self._backend.decode([i for i in ids if i != self.eos_id])
