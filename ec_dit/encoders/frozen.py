"""The frozen encoders of a latent run, loaded once from `config.encoders`: T5 for prompts, the VAE for images.

`python -m ec_dit.prepare` encodes a dataset with them (images -> latent mean and
std, captions -> T5 features), and a run with `config.text.encoder = "t5"`
samples with them (prompts -> T5 features -> DiT -> VAE decode -> uint8).

    enc = FrozenEncoders.from_config(config.encoders, context_len=120)
    features, mask, lengths, truncated = enc.text_features(["a photo of a cat"])
    mean, std = enc.latent_stats(images_uint8)       # [B, H/8, W/8, 4] each
    images = enc.decode(latents)                     # uint8 [B, H, W, 3]
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from ec_dit import primitives, sharding
from ec_dit.encoders import hf_checkpoint as hf
from ec_dit.encoders.t5 import T5Encoder
from ec_dit.encoders.t5_tokenizer import T5Tokenizer
from ec_dit.encoders.vae import AutoencoderKL


def config_hash(folder: str, subfolder: str) -> str:
  """sha256 (first 16 hex digits) of a checkpoint's config.json, canonicalised: which weights' shapes."""
  cfg = hf.read_config(hf.model_folder(folder, subfolder))
  return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def _missing(field: str, what: str) -> ValueError:
  return ValueError(f"config.encoders.{field}: not set; a latent run needs {what} (a local Hugging Face folder; "
                    f"see the README section \"Train EC-DiT on your own data\")")


def _pad(x: np.ndarray, n: int) -> np.ndarray:
  return x if len(x) == n else np.concatenate([x, np.zeros((n - len(x),) + x.shape[1:], x.dtype)])


class FrozenEncoders:
  """T5 (with its tokenizer) and the VAE of a latent run, jitted, `batch_size` items per call.

  `FrozenEncoders.from_config(config.encoders, context_len=...)` loads them from their
  folders; the constructor takes modules already built (e.g. random ones for a benchmark).

  Args:
    t5, tokenizer, vae: the modules (either pair may be None when a job does not use it).
    context_len: text tokens per prompt, EOS included (`config.model.context_len`).
    batch_size: items per jitted call (the last chunk is padded: one compilation).
    mesh: optional; every call's batch is split over the mesh's batch axes.
    info: what the manifest records about the encoders (paths, config hashes, scaling).
  """

  def __init__(self, t5: T5Encoder | None, tokenizer: T5Tokenizer | None, vae: AutoencoderKL | None, *,
               context_len: int, batch_size: int = 16, mesh: Mesh | None = None, rules=sharding.DEFAULT_RULES,
               info: dict | None = None):
    self.t5, self.tokenizer, self.vae = t5, tokenizer, vae
    self.batch_size, self.context_len, self.mesh, self.rules = int(batch_size), int(context_len), mesh, rules
    self.info = dict(info or {})
    if t5 is not None:
      self._t5_graph, self._t5_state = nnx.split(t5)
    if vae is not None:
      self._vae_graph, self._vae_state = nnx.split(vae)
      c = vae.config
      self.info.setdefault("vae", {}).update(
          scaling_factor=float(c.scaling_factor), shift_factor=None if c.shift_factor is None else float(c.shift_factor))

  @classmethod
  def from_config(cls, encoders_config, *, context_len: int, need_t5: bool = True, need_vae: bool = True,
                  mesh: Mesh | None = None, rules=sharding.DEFAULT_RULES) -> "FrozenEncoders":
    """Loads the folders `config.encoders` names (a missing path is an error naming the field); with
    `mesh`, parameters are placed by the mesh rules as they are read."""
    e = encoders_config
    dtype = primitives.compute_dtype(e.dtype)
    t5 = tokenizer = vae = None
    info = {}
    if need_t5:
      if not e.t5_path:
        raise _missing("t5_path", "the T5 encoder its features were prepared with")
      tokenizer = T5Tokenizer.from_pretrained(e.t5_path, context_len=context_len)
      t5 = T5Encoder.from_pretrained(e.t5_path, dtype=dtype, param_dtype=dtype, mesh=mesh, rules=rules)
      info["t5"] = {"path": os.path.abspath(e.t5_path), "config_sha256": config_hash(e.t5_path, "text_encoder")}
    if need_vae:
      if not e.vae_path:
        raise _missing("vae_path", "the VAE its latents were prepared with")
      vae = AutoencoderKL.from_pretrained(e.vae_path, dtype=dtype, param_dtype=dtype, mesh=mesh, rules=rules)
      info["vae"] = {"path": os.path.abspath(e.vae_path), "config_sha256": config_hash(e.vae_path, "vae")}
    return cls(t5, tokenizer, vae, context_len=context_len, batch_size=e.batch_size, mesh=mesh, rules=rules,
               info=info)

  def latent_shape(self, image_size: int) -> tuple[int, int, int]:
    """(h, w, c) of the latent of an image_size x image_size image."""
    c = self.vae.config
    f = 2 ** (len(c.block_out_channels) - 1)
    if image_size % f:
      raise ValueError(f"config.input.image_size: must be divisible by the VAE's downsampling factor {f}, "
                       f"got {image_size}")
    return (image_size // f, image_size // f, int(c.latent_channels))

  @property
  def feature_dim(self) -> int:
    return int(self.t5.config.d_model)

  # -- placement and chunking -----------------------------------------------
  def _put(self, x: np.ndarray):
    if self.mesh is None:
      return jnp.asarray(x)
    return jax.device_put(x, sharding.batch_sharding(self.mesh, self.rules, x.shape[0], x.ndim))

  def _chunks(self, fn, *arrays: np.ndarray) -> list[np.ndarray]:
    """fn over `batch_size` rows at a time (the last chunk padded: one compilation); host outputs."""
    n, outs = len(arrays[0]), []
    for start in range(0, n, self.batch_size):
      parts = [_pad(a[start:start + self.batch_size], self.batch_size) for a in arrays]
      result = fn(*[self._put(p) for p in parts])
      result = result if isinstance(result, tuple) else (result,)
      outs.append([np.asarray(r)[:min(self.batch_size, n - start)] for r in result])
    return [np.concatenate([o[i] for o in outs]) for i in range(len(outs[0]))] if outs else []

  # -- text --------------------------------------------------------------------
  def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids [B, L], mask [B, L], truncated [B]) with EOS appended; long prompts are cut to the context."""
    truncated = np.asarray([len(self.tokenizer.pieces(p)) + 1 > self.context_len for p in prompts], bool)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # counted in `truncated` instead of a warning per prompt
      ids, mask = self.tokenizer(list(prompts)) if len(prompts) else (
          np.zeros((0, self.context_len), np.int32), np.zeros((0, self.context_len), bool))
    return ids, mask, truncated

  def text_features(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(features float32 [B, L, d] zero past each prompt, mask [B, L], lengths [B], truncated [B])."""
    ids, mask, truncated = self.tokenize(prompts)
    (features,) = self._chunks(lambda i, m: _t5(self._t5_graph, self._t5_state, i, m), ids, mask)
    features = np.asarray(features, np.float32) * mask[..., None]
    return features, mask, mask.sum(axis=1).astype(np.int32), truncated

  # -- images ------------------------------------------------------------------
  def latent_stats(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [B, H, W, 3] -> the VAE posterior's (mean, std), float32 [B, h, w, c], unscaled."""
    x = np.asarray(images, np.uint8)
    mean, std = self._chunks(lambda im: _encode(self._vae_graph, self._vae_state, im), x)
    return mean, std

  def decode(self, latents: np.ndarray) -> np.ndarray:
    """Scaled diffusion latents [B, h, w, c] -> uint8 images [B, H, W, 3]."""
    (images,) = self._chunks(lambda z: _decode(self._vae_graph, self._vae_state, z), np.asarray(latents, np.float32))
    return images


def _t5_impl(graph, state, ids, mask):
  return nnx.merge(graph, state)(ids, mask).astype(jnp.float32)


def _encode_impl(graph, state, images):
  vae = nnx.merge(graph, state)
  mean, logvar = vae.encode(images.astype(jnp.float32) / 127.5 - 1.0)
  return mean, jnp.exp(0.5 * logvar)


def _decode_impl(graph, state, latents):
  vae = nnx.merge(graph, state)
  c = vae.config
  x = vae.decode(latents / c.scaling_factor + (c.shift_factor or 0.0))
  return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


_t5 = jax.jit(_t5_impl, static_argnums=0)
_encode = jax.jit(_encode_impl, static_argnums=0)
_decode = jax.jit(_decode_impl, static_argnums=0)
