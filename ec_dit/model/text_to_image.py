"""The text-to-image model: a text encoder and the DiT, trained together.

`abstract_model(config)` is the one place that builds the model without
weights (ShapeDtypeStructs only): training shardings, checkpoint targets,
inference and the model summary all call it.
"""

from __future__ import annotations

import jax
import ml_collections
from flax import nnx

from ec_dit import primitives
from ec_dit.model import dit, text_encoder


class TextToImage(nnx.Module):
  """Text encoder + EC-DiT.

  `velocity, aux = model(x_t, t, tokens, mask)`; `model.encode_prompt(tokens, mask)`
  gives the DiT's text K/V cache for sampling. `model.dit` is the diffusion
  transformer alone, for users with their own (e.g. frozen T5) text features.

  With `config.text.encoder = "t5"` there is no trainable encoder: `tokens` are
  then the prepared text features [B, L, context_dim] (float) and go to the DiT's
  caption projection directly (PixArt-alpha's setting).
  """

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    m, t = config.model, config.text
    self.text = (text_encoder.TextEncoder(t.vocab_size, m.context_len, m.context_dim, t.depth, t.num_heads,
                                          rngs=rngs, dtype=primitives.compute_dtype(m.dtype))
                 if t.encoder == "trainable" else None)
    self.dit = dit.DiT(m, rngs=rngs)

  def encode_prompt(self, tokens: jax.Array, mask: jax.Array) -> dit.ContextCache:
    features = tokens if self.text is None else self.text(tokens, mask)
    return self.dit.encode_context(features, mask)

  def __call__(self, x: jax.Array, t: jax.Array, tokens: jax.Array, mask: jax.Array):
    return self.dit(x, t, context_cache=self.encode_prompt(tokens, mask))


def abstract_model(config: ml_collections.ConfigDict, *, seed: int = 0) -> TextToImage:
  """The model of `config` with ShapeDtypeStructs in place of arrays (no memory allocated)."""
  return nnx.eval_shape(lambda: TextToImage(config, rngs=nnx.Rngs(seed)))


def abstract_params(config: ml_collections.ConfigDict) -> dict:
  """ShapeDtypeStructs of the model parameters as a pure dict."""
  return nnx.to_pure_dict(nnx.state(abstract_model(config), nnx.Param))
