"""The Stable Diffusion VAE (`AutoencoderKL` as diffusers defines it) in Flax NNX, NHWC.

Encoder: conv_in, down blocks of ResNet blocks (GroupNorm + SiLU + 3x3 convs,
a 1x1 shortcut when the width changes) each but the last ending in a stride-2
conv on the input padded by one row/column at the bottom/right, a mid block
(ResNet, single-head self-attention, ResNet), GroupNorm + SiLU, conv_out to
2 x latent channels: the mean and log-variance (clipped to [-30, 20]) of a
diagonal Gaussian, after the optional 1x1 `quant_conv`. The decoder mirrors it
(optional `post_quant_conv`, mid block, up blocks of `layers_per_block + 1`
ResNet blocks, nearest x2 upsampling and a conv). Images are NHWC in [-1, 1].

Latents for a diffusion model are `(z - shift_factor) * scaling_factor`
(`latents_from_images`); `images_from_latents` undoes it and decodes, both
jitted and in chunks of `batch_size` images so large batches fit in memory.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from ec_dit import primitives, sharding
from ec_dit.encoders import hf_checkpoint as hf

_ONES, _ZEROS = nnx.initializers.ones_init(), nnx.initializers.zeros_init()
_CONV_INIT = nnx.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3)
_OLD_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The autoencoder's shape, as in a diffusers `config.json` (`VAEConfig.from_dict` reads one)."""
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  @classmethod
  def from_dict(cls, cfg: dict) -> "VAEConfig":
    """From a parsed config.json; raises CheckpointError for architectures not implemented here."""
    checks = [("_class_name", cfg.get("_class_name", "AutoencoderKL"), ("AutoencoderKL",)),
              ("act_fn", cfg.get("act_fn", "silu"), ("silu",))]
    checks += [("down_block_types", t, ("DownEncoderBlock2D",)) for t in cfg.get("down_block_types", ())]
    checks += [("up_block_types", t, ("UpDecoderBlock2D",)) for t in cfg.get("up_block_types", ())]
    for field, value, allowed in checks:
      if value not in allowed:
        raise hf.unsupported(field, value, allowed)
    kwargs = hf.config_fields(cls, cfg)
    kwargs["block_out_channels"] = tuple(kwargs.get("block_out_channels", cls.block_out_channels))
    return cls(**kwargs)


class Conv(nnx.Module):
  """2D convolution, NHWC input, HWIO kernel; `padding` as in lax (or "SAME"-like ints)."""

  def __init__(self, cin: int, cout: int, k: int, *, rngs: nnx.Rngs, stride: int = 1, padding=None,
               dtype=jnp.float32, param_dtype=jnp.float32):
    self.kernel = primitives.param(rngs, _CONV_INIT, (k, k, cin, cout),
                           ("kernel_spatial", "kernel_spatial", "channels", "channels"), param_dtype)
    self.bias = primitives.param(rngs, _ZEROS, (cout,), ("channels",), param_dtype)
    self.stride, self.dtype = stride, dtype
    self.padding = ((k // 2, k // 2),) * 2 if padding is None else padding

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.lax.conv_general_dilated(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                                     (self.stride, self.stride), self.padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + self.bias[...].astype(self.dtype)


class GroupNorm(nnx.Module):
  """GroupNorm over (H, W, channels of a group), computed in float32, with a per-channel affine."""

  def __init__(self, channels: int, groups: int, *, rngs: nnx.Rngs, eps: float = 1e-6, param_dtype=jnp.float32):
    if channels % groups:
      raise hf.CheckpointError(f"config.json: {channels} channels do not split into norm_num_groups={groups}")
    self.scale = primitives.param(rngs, _ONES, (channels,), ("channels",), param_dtype)
    self.bias = primitives.param(rngs, _ZEROS, (channels,), ("channels",), param_dtype)
    self.groups, self.eps = groups, eps

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    g = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
    mean = jnp.mean(g, axis=(1, 2, 4), keepdims=True)
    var = jnp.mean(jnp.square(g - mean), axis=(1, 2, 4), keepdims=True)
    y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
    return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class ResnetBlock(nnx.Module):
  def __init__(self, cin: int, cout: int, groups: int, *, rngs: nnx.Rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.norm1 = GroupNorm(cin, groups, rngs=rngs, param_dtype=param_dtype)
    self.conv1 = Conv(cin, cout, 3, **kw)
    self.norm2 = GroupNorm(cout, groups, rngs=rngs, param_dtype=param_dtype)
    self.conv2 = Conv(cout, cout, 3, **kw)
    self.conv_shortcut = Conv(cin, cout, 1, **kw) if cin != cout else None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nnx.Module):
  """Single-head self-attention over all H x W positions, with a residual (diffusers' VAE attention)."""

  def __init__(self, c: int, groups: int, *, rngs: nnx.Rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.group_norm = GroupNorm(c, groups, rngs=rngs, param_dtype=param_dtype)
    self.to_q, self.to_k, self.to_v, self.to_out = (primitives.Linear(c, c, ("channels", "channels"), **kw)
                                                    for _ in range(4))

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    t = self.group_norm(x).reshape(b, h * w, c)
    q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
    scores = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) / np.sqrt(c)
    out = jnp.einsum("bqk,bkc->bqc", jax.nn.softmax(scores, axis=-1).astype(v.dtype), v)
    return x + self.to_out(out).reshape(b, h, w, c)


class MidBlock(nnx.Module):
  def __init__(self, c: int, groups: int, attention: bool, *, rngs: nnx.Rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.resnets = nnx.List([ResnetBlock(c, c, groups, **kw) for _ in range(2)])
    self.attention = Attention(c, groups, **kw) if attention else None

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.resnets[0](x)
    if self.attention is not None:
      x = self.attention(x)
    return self.resnets[1](x)


class _Stage(nnx.Module):
  """ResNet blocks, then an optional resampling conv: stride-2 down, or nearest x2 up."""

  def __init__(self, widths: list[tuple[int, int]], groups: int, resample: str | None, *, rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.resnets = nnx.List([ResnetBlock(cin, cout, groups, **kw) for cin, cout in widths])
    c = widths[-1][1]
    self.resample = resample
    # diffusers pads (0, 1, 0, 1) then convolves 3x3 with stride 2 and no padding.
    self.conv = (Conv(c, c, 3, stride=2, padding=((0, 1), (0, 1)), **kw) if resample == "down" else
                 Conv(c, c, 3, **kw) if resample == "up" else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x = resnet(x)
    if self.resample == "up":
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return x if self.conv is None else self.conv(x)


class Encoder(nnx.Module):
  def __init__(self, c: VAEConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    chans, g, n = c.block_out_channels, c.norm_num_groups, c.layers_per_block
    self.conv_in = Conv(c.in_channels, chans[0], 3, **kw)
    stages, prev = [], chans[0]
    for i, width in enumerate(chans):
      widths = [(prev if j == 0 else width, width) for j in range(n)]
      stages.append(_Stage(widths, g, "down" if i < len(chans) - 1 else None, **kw))
      prev = width
    self.down_blocks = nnx.List(stages)
    self.mid_block = MidBlock(chans[-1], g, c.mid_block_add_attention, **kw)
    self.conv_norm_out = GroupNorm(chans[-1], g, rngs=rngs, param_dtype=param_dtype)
    self.conv_out = Conv(chans[-1], 2 * c.latent_channels, 3, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_in(x)
    for stage in self.down_blocks:
      x = stage(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nnx.Module):
  def __init__(self, c: VAEConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    chans, g, n = tuple(reversed(c.block_out_channels)), c.norm_num_groups, c.layers_per_block
    self.conv_in = Conv(c.latent_channels, chans[0], 3, **kw)
    self.mid_block = MidBlock(chans[0], g, c.mid_block_add_attention, **kw)
    stages, prev = [], chans[0]
    for i, width in enumerate(chans):
      widths = [(prev if j == 0 else width, width) for j in range(n + 1)]
      stages.append(_Stage(widths, g, "up" if i < len(chans) - 1 else None, **kw))
      prev = width
    self.up_blocks = nnx.List(stages)
    self.conv_norm_out = GroupNorm(chans[-1], g, rngs=rngs, param_dtype=param_dtype)
    self.conv_out = Conv(chans[-1], c.out_channels, 3, **kw)

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.mid_block(self.conv_in(z))
    for stage in self.up_blocks:
      x = stage(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
  """The KL autoencoder: `encode(images) -> (mean, logvar)`, `decode(z) -> images`, all NHWC.

  `dtype` is the compute dtype (GroupNorm and softmax run in float32 either
  way), `param_dtype` the parameters' storage dtype.
  """

  def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    c = self.config = config
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.encoder = Encoder(c, **kw)
    self.decoder = Decoder(c, **kw)
    self.quant_conv = Conv(2 * c.latent_channels, 2 * c.latent_channels, 1, **kw) if c.use_quant_conv else None
    self.post_quant_conv = Conv(c.latent_channels, c.latent_channels, 1, **kw) if c.use_post_quant_conv else None

  def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """images [B, H, W, in_channels] in [-1, 1] -> mean, logvar [B, H/f, W/f, latent_channels] (float32)."""
    moments = self.encoder(images)
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z: jax.Array) -> jax.Array:
    """Unscaled latents z [B, h, w, latent_channels] -> images [B, H, W, out_channels] (float32, not clipped)."""
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def latents_from_images(self, images, *, batch_size: int = 16, rng: jax.Array | None = None,
                          mesh: Mesh | None = None) -> np.ndarray:
    """Diffusion latents `(z - shift_factor) * scaling_factor` of images, jitted, `batch_size` at a time.

    z is the posterior mean, or a sample when `rng` is given. With `mesh`, each
    chunk is split over the mesh's batch axes (`batch_size` should divide by them).
    Returns a host array.
    """
    return _chunked(self, _latents, images, batch_size, rng, mesh)

  def images_from_latents(self, latents, *, batch_size: int = 16, mesh: Mesh | None = None) -> np.ndarray:
    """Images [B, H, W, C] (about [-1, 1]) of diffusion latents, jitted, `batch_size` at a time, on the host."""
    return _chunked(self, _images, latents, batch_size, None, mesh)

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=jnp.float32,
                      mesh: Mesh | None = None, rules=sharding.DEFAULT_RULES) -> "AutoencoderKL":
    """Loads a local diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors).

    The folder may also be a pipeline's `vae/` subfolder. Old (`query`, `key`,
    `value`, `proj_attn`) and new (`to_q`, ..., `to_out.0`) attention names both load.
    """
    return hf.load_pretrained(cls, VAEConfig, path, subfolder="vae", stems=("diffusion_pytorch_model", "model"),
                              sources=checkpoint_sources, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules)


def _latents(vae: AutoencoderKL, images, key):
  mean, logvar = vae.encode(images)
  z = mean if key is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
  return (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor


def _images(vae: AutoencoderKL, latents, key):
  del key
  return vae.decode(latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _run(graphdef, fn, state, x, key):
  return fn(nnx.merge(graphdef, state), x, key)


def _chunked(vae: AutoencoderKL, fn, x, batch_size: int, rng, mesh) -> np.ndarray:
  """fn(vae, chunk, key) over chunks of `batch_size` (the last one padded: one compilation), gathered on the host."""
  graphdef, state = nnx.split(vae)
  x = np.asarray(x)
  outs = []
  for i, start in enumerate(range(0, len(x), batch_size)):
    chunk = x[start:start + batch_size]
    n = len(chunk)
    if n < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:], chunk.dtype)])
    if mesh is not None:
      chunk = jax.device_put(chunk, sharding.batch_sharding(mesh, sharding.DEFAULT_RULES, batch_size, chunk.ndim))
    key = None if rng is None else jax.random.fold_in(rng, i)
    outs.append(np.asarray(_run(graphdef, fn, state, chunk, key))[:n])
  return np.concatenate(outs)


def checkpoint_sources(abstract: AutoencoderKL) -> dict[str, hf.Source]:
  """Parameter path -> the diffusers tensor(s) it is read from (old attention names as alternatives)."""
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(abstract)):
    parts = [str(p) for p in path]
    leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[parts[-1]]
    if parts[1] in ("down_blocks", "up_blocks") and parts[3] == "conv":  # a stage's resampling conv
      parts_hf = parts[:3] + ["downsamplers.0.conv" if parts[1] == "down_blocks" else "upsamplers.0.conv"]
    else:
      parts_hf = [{"attention": "attentions.0", "to_out": "to_out.0"}.get(p, p) for p in parts[:-1]]
    module = ".".join(parts_hf)
    names = (f"{module}.{leaf}",)
    if ".attentions.0.to_" in module:
      for new, old in _OLD_ATTENTION.items():
        if module.endswith(new):
          names += (f"{module[:-len(new)]}{old}.{leaf}",)
    perm = None if parts[-1] != "kernel" else hf.CONV if len(var.shape) == 4 else hf.LINEAR
    out[".".join(parts)] = hf.Source(names, perm)
  return out
