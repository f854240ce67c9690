"""Inputs and outputs of the DiT: patches, positions, timesteps, text projection."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ec_dit import primitives


def patchify(x: jax.Array, patch_size: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C], patches in row-major order."""
  b, h, w, c = x.shape
  p = patch_size
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: jax.Array, patch_size: int, height: int, width: int, channels: int) -> jax.Array:
  """Inverse of `patchify`: [B, N, p*p*C] -> [B, H, W, C]."""
  b = x.shape[0]
  p = patch_size
  x = x.reshape(b, height // p, width // p, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, height, width, channels)


def sincos_2d(embed_dim: int, grid_h: int, grid_w: int) -> np.ndarray:
  """Fixed 2D sin-cos position embedding [grid_h*grid_w, embed_dim] (MAE/DiT recipe).

  Half the channels encode the row, half the column; each half is 1D sin-cos.
  """
  if embed_dim % 4:
    raise ValueError(f"hidden_size must be divisible by 4 for 2D sin-cos positions, got {embed_dim}")

  def one_d(dim, pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij")
  emb = np.concatenate([one_d(embed_dim // 2, rows), one_d(embed_dim // 2, cols)], axis=1)
  return emb.astype(np.float32)


def timestep_features(t: jax.Array, dim: int, max_period: float = 10000.0, scale: float = 1000.0,
                      shift: int = 0) -> jax.Array:
  """Sinusoidal features of continuous t in [0, 1] -> [B, dim] float32, cosines first.

  t is multiplied by `scale` (1000) first: with t in [0, 1] the raw features
  would barely change across the whole range, since the fastest frequency is 1.
  `shift` is diffusers' `downscale_freq_shift` (frequencies exp(-ln(max_period)
  i / (dim/2 - shift))): 0 in DiT and PixArt-alpha, 1 in diffusers' DiT port.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - shift))
  args = (t.astype(jnp.float32) * scale)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


def pixart_positions(embed_dim: int, grid_h: int, grid_w: int, base_size: int,
                     interpolation_scale: float) -> np.ndarray:
  """PixArt-alpha's (and diffusers' `get_2d_sincos_pos_embed`) positions [grid_h*grid_w, D].

  The first half of the channels encodes the column, the second the row (DiT's
  order); coordinates are rescaled to a `base_size` grid and divided by
  `interpolation_scale` (2 for the 1024 px model), so any grid spans the same range.
  """
  rows = np.arange(grid_h, dtype=np.float32) / np.float32(grid_h / base_size) / np.float32(interpolation_scale)
  cols = np.arange(grid_w, dtype=np.float32) / np.float32(grid_w / base_size) / np.float32(interpolation_scale)
  r, c = np.meshgrid(rows.astype(np.float64), cols.astype(np.float64), indexing="ij")
  half = embed_dim // 2
  return np.concatenate([_one_d(half, c), _one_d(half, r)], axis=1).astype(np.float32)


def _one_d(dim: int, pos: np.ndarray) -> np.ndarray:
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.einsum("m,d->md", pos.reshape(-1), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


class PatchEmbed(nnx.Module):
  """Linear projection of p x p patches (equivalent to DiT's strided conv)."""

  def __init__(self, patch_size: int, in_channels: int, d: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.patch_size = patch_size
    self.proj = primitives.Linear(patch_size * patch_size * in_channels, d, ("patch", "embed"), rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.proj(patchify(x, self.patch_size))


class TimestepEmbedder(nnx.Module):
  """t in [0, 1] -> sinusoidal features of scale * t -> SiLU MLP -> [B, D].

  `scale=1.0` embeds t as given (DDPM timesteps 0..999, as DiT, PixArt-alpha and
  diffusers take them; also PixArt's resolution and aspect-ratio values).
  """

  def __init__(self, d: int, *, frequency_dim: int = 256, scale: float = 1000.0, rngs: nnx.Rngs,
               dtype=jnp.float32):
    self.frequency_dim = frequency_dim
    self.scale = scale
    normal = nnx.initializers.normal(0.02)
    self.fc1 = primitives.Linear(frequency_dim, d, ("unmodeled", "embed"), kernel_init=normal, rngs=rngs, dtype=dtype)
    self.fc2 = primitives.Linear(d, d, ("mlp", "embed"), kernel_init=normal, rngs=rngs, dtype=dtype)

  def __call__(self, t: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.silu(self.fc1(timestep_features(t, self.frequency_dim, scale=self.scale))))


class ContextEmbedder(nnx.Module):
  """PixArt-alpha's caption projection: text features [B, L, Dc] -> [B, L, D] through a GELU MLP."""

  def __init__(self, context_dim: int, d: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.fc1 = primitives.Linear(context_dim, d, ("unmodeled", "embed"), rngs=rngs, dtype=dtype)
    self.fc2 = primitives.Linear(d, d, ("mlp", "embed"), rngs=rngs, dtype=dtype)

  def __call__(self, context: jax.Array) -> jax.Array:
    return self.fc2(primitives.gelu(self.fc1(context)))
