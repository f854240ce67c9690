"""The text-to-image model: a text encoder and the DiT, trained together."""

from __future__ import annotations

import jax
import ml_collections
from flax import nnx

from ec_dit import dit, text


class TextToImage(nnx.Module):
  """Text encoder + EC-DiT.

  `velocity, aux = model(x_t, t, tokens, mask)`; `model.encode_prompt(tokens, mask)`
  gives the DiT's text K/V cache for sampling. `model.dit` is the diffusion
  transformer alone, for users with their own (e.g. frozen T5) text features.
  """

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    m, t = config.model, config.text
    self.text = text.TextEncoder(t.vocab_size, m.context_len, m.context_dim, t.depth, t.num_heads,
                                 rngs=rngs, dtype=dit.nn.compute_dtype(m.dtype))
    self.dit = dit.DiT(m, rngs=rngs)

  def encode_prompt(self, tokens: jax.Array, mask: jax.Array) -> dit.ContextCache:
    return self.dit.encode_context(self.text(tokens, mask), mask)

  def __call__(self, x: jax.Array, t: jax.Array, tokens: jax.Array, mask: jax.Array):
    return self.dit(x, t, context_cache=self.encode_prompt(tokens, mask))
