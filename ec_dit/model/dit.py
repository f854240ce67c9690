"""The text-conditioned diffusion transformer (PixArt-alpha blocks, EC-DiT FFNs).

Block (EC-DiT, after PixArt-alpha):
    x = x + gate1 * SelfAttn(modulate(LN(x), shift1, scale1))       # adaLN-Zero
    x = x + CrossAttn(x, text, text_mask)                            # PixArt: no norm, no gate
    r = x                      (or LN(x) with decoupled_routing)     # router input
    x = x + gate2 * FFN(modulate(LN(x), shift2, scale2), router_input=r)

The FFN at each layer is dense, or an MoE of the configured kind at the MoE
positions (`moe_every`, `dense_first_n`). The model returns the predicted
velocity and an `aux` dict: the weighted auxiliary loss and every MoE layer's
diagnostics (see `ec_dit.moe.layers`).

PixArt-alpha's own options (`ec_dit.convert.pixart` imports its weights):
  conditioning="adaln_single": one timestep MLP gives 6d modulation values for all
    blocks (`t_block`); each block adds its learned `scale_shift_table` [6, d], the
    final layer its [2, d] table to the timestep embedding itself.
  prediction="epsilon": a DDPM noise prediction, timesteps 0..999 embedded as given
    (as diffusers takes them); with learn_sigma the output has 2C channels.
  micro_conditions: resolution and aspect-ratio embeddings added to the timestep's (1024 px).
  positions="pixart": PixArt's sin-cos positions, rescaled to the trained grid.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
import ml_collections

from ec_dit import primitives
from ec_dit.model import attention, embeddings
from ec_dit.moe import layers as moe_layers

# Activation checkpointing per block: `model.remat_policy` (one of `schema.REMAT_POLICIES`) -> its
# jax.checkpoint policy (None = no remat).
REMAT_POLICY_OF = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# What the network's last layer predicts (`model.prediction`, one of `schema.PREDICTIONS`). The
# model always *returns* the velocity eps - x0 (the rectified-flow target), so losses and samplers
# never change.
#   velocity: the output is the velocity (EC-DiT, SD3).
#   x0: the output is the clean image and v = (x_t - x0) / t (JiT, Li & He 2025,
#       "Back to Basics: Let Denoising Generative Models Denoise"). In pixel space the
#       clean image is far simpler to produce than the noise-laden velocity, which a
#       small transformer otherwise has to carry through every block.
X0_MIN_T = 0.05  # x0 mode: t in the denominator is clipped here (JiT clips alike)
VAE_SCALE = 8  # micro-conditions: latent pixels -> image pixels (SD VAE), for the default resolution


class ContextCache(NamedTuple):
  """Text K/V of every cross-attention (and the pooled text), computed once per sampling run."""
  kv: tuple[attention.TextKV, ...]
  mask: jax.Array
  pooled: jax.Array | None = None


def is_moe_layer(index: int, ffn_config) -> bool:
  """Layer `index` (0-based) holds an MoE: past the dense prefix, every `moe_every`-th layer."""
  return index >= ffn_config.dense_first_n and (index + 1) % ffn_config.moe_every == 0


def make_ffn(index: int, model_config, *, rngs: nnx.Rngs, dtype):
  """The FFN of layer `index`, by the config's kind and placement."""
  m, f = model_config, model_config.ffn
  d = m.hidden_size
  hidden = int(m.mlp_ratio * d)
  if not is_moe_layer(index, f):
    return moe_layers.DenseMLP(d, hidden, activation=f.activation, rngs=rngs, dtype=dtype)
  if f.kind == "dense":
    return moe_layers.DenseMLP(d, int(f.dense_mlp_ratio * d), activation=f.activation, rngs=rngs, dtype=dtype)
  common = dict(num_experts=f.num_experts, hidden=hidden, dispatch=f.dispatch, group_size=f.routing_group_size,
                activation=f.activation, rngs=rngs, dtype=dtype)
  if f.kind == "expert_choice":
    return moe_layers.ExpertChoiceMoE(d, train_capacity_factor=f.train_capacity_factor,
                                      eval_capacity_factor=f.eval_capacity_factor, **common)
  if f.kind == "token_choice":
    return moe_layers.TokenChoiceMoE(d, k=f.top_k, num_shared_experts=f.num_shared_experts,
                                     capacity_factor=f.token_capacity_factor,
                                     renormalize_gates=f.renormalize_gates,
                                     dropless_impl=f.dropless_impl, **common)
  raise ValueError(f"config.model.ffn.kind: unknown {f.kind!r}")


class DiTBlock(nnx.Module):
  """adaLN-Zero self-attention, cross-attention to the text, adaLN-modulated gated FFN."""

  def __init__(self, index: int, model_config, *, rngs: nnx.Rngs, dtype=jnp.float32):
    d = model_config.hidden_size
    self.decoupled_routing = bool(model_config.ffn.decoupled_routing)
    # adaln_single (PixArt-alpha): c is already t_block's [B, 6d]
    _init_modulation(self, 6, d, model_config.conditioning == "adaln_single", rngs, dtype)
    self.attn = attention.SelfAttention(d, model_config.num_heads, rngs=rngs, dtype=dtype)
    self.cross_attn = attention.CrossAttention(d, model_config.num_heads, rngs=rngs, dtype=dtype)
    self.ffn = make_ffn(index, model_config, rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array, c: jax.Array, kv: attention.TextKV, mask: jax.Array):
    if self.adaln is None:
      shift1, scale1, gate1, shift2, scale2, gate2 = _add_table(self.scale_shift_table, c)
    else:
      shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(self.adaln(jax.nn.silu(c)), 6, axis=-1)
    x = x + gate1[:, None] * self.attn(primitives.modulate(primitives.layer_norm(x), shift1, scale1))
    x = x + self.cross_attn(x, kv, mask)
    h = primitives.layer_norm(x)
    # EC-DiT routes on the token state after cross-attention; decoupled routing
    # (Nucleus-Image) routes on its normalised form, before timestep modulation.
    router_input = h if self.decoupled_routing else x
    y, diagnostics = self.ffn(primitives.modulate(h, shift2, scale2), router_input)
    return x + gate2[:, None] * y, diagnostics


def _init_modulation(module: nnx.Module, rows: int, d: int, single: bool, rngs: nnx.Rngs, dtype) -> None:
  """A block's `rows` x d adaLN modulation: with adaLN-single (PixArt-alpha) a learned `scale_shift_table` added
  to the shared t_block's output and no `adaln`; otherwise its own zero-initialised `adaln` Linear (adaLN-Zero)."""
  if single:
    module.adaln, module.scale_shift_table = None, _table(rngs, rows, d)
  else:
    module.adaln = primitives.Linear(d, rows * d, ("embed", "modulation"), kernel_init=primitives.zeros_init,
                                     rngs=rngs, dtype=dtype)


def _table(rngs: nnx.Rngs, rows: int, d: int) -> nnx.Param:
  """PixArt-alpha's `scale_shift_table` [rows, d], initialised as randn / sqrt(d)."""
  return primitives.param(rngs, nnx.initializers.normal(d ** -0.5), (rows, d), ("unmodeled", "embed"))


def _add_table(table: nnx.Param, c: jax.Array) -> list[jax.Array]:
  """table [n, d] + c [B, n*d] -> n arrays [B, d] (PixArt's `(table[None] + c.reshape(B, n, d)).chunk(n)`)."""
  n, d = table.shape
  mod = table[...][None].astype(c.dtype) + c.reshape(c.shape[0], n, d)
  return [mod[:, i] for i in range(n)]


def num_long_skips(depth: int) -> int:
  """U-ViT pairs the first n blocks with the last n, around at least one middle block."""
  return (depth - 1) // 2


def _keep_first_half(key, shape, dtype):
  """[2d, d] kernel mapping concat(h, skip) -> h: the skip starts switched off."""
  del key
  d = shape[1]
  return jnp.concatenate([jnp.eye(d, dtype=dtype), jnp.zeros((shape[0] - d, d), dtype)])


class FinalLayer(nnx.Module):
  """adaLN + zero-initialised linear to p*p*C values per token.

  `single=True` (PixArt-alpha's adaLN-single): shift and scale are a learned
  `scale_shift_table` [2, d] plus the timestep embedding c itself.
  """

  def __init__(self, d: int, patch_size: int, out_channels: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               single: bool = False):
    _init_modulation(self, 2, d, single, rngs, dtype)
    self.proj = primitives.Linear(d, patch_size * patch_size * out_channels, ("embed", "patch"),
                          kernel_init=primitives.zeros_init, rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    if self.adaln is None:
      shift, scale = _add_table(self.scale_shift_table, jnp.concatenate([c, c], axis=-1))
      return self.proj(primitives.modulate(primitives.layer_norm(x), shift, scale))
    shift, scale = jnp.split(self.adaln(jax.nn.silu(c)), 2, axis=-1)
    return self.proj(primitives.modulate(primitives.layer_norm(x), shift, scale))


class DiT(nnx.Module):
  """EC-DiT: a text-to-image diffusion transformer whose FFNs may be Mixtures of Experts.

  Call: `velocity, aux = model(x_t, t, context, context_mask)` with x_t
  [B, H, W, C], t [B] in [0, 1], context [B, L, context_dim] text features and
  context_mask [B, L] bool. Pass `context_cache=model.encode_context(...)`
  instead of context to reuse the text K/V across denoising steps.

  With prediction="epsilon" (PixArt-alpha) t is the DDPM timestep in [0, 1000)
  as diffusers takes it, and the output is the raw network output: the noise,
  then with learn_sigma the C variance values. With micro_conditions,
  `micro=(resolution [B, 2] (height, width) in pixels, aspect_ratio [B, 1])`
  (default: the latent size times VAE_SCALE, as PixArt's pipeline passes it).
  """

  def __init__(self, model_config, *, rngs: nnx.Rngs):
    m = ml_collections.FrozenConfigDict(model_config)
    self.config = m
    dtype = primitives.compute_dtype(m.dtype)
    d = m.hidden_size
    self.patch_embed = embeddings.PatchEmbed(m.patch_size, m.in_channels, d, rngs=rngs, dtype=dtype)
    raw_t = 1.0 if m.prediction == "epsilon" else 1000.0  # DDPM timesteps are embedded as given
    self.t_embed = embeddings.TimestepEmbedder(d, scale=raw_t, rngs=rngs, dtype=dtype)
    if m.micro_conditions:  # PixArt-alpha 1024: (height, width) and height/width, d/3 each
      self.resolution_embed = embeddings.TimestepEmbedder(d // 3, scale=1.0, rngs=rngs, dtype=dtype)
      self.aspect_embed = embeddings.TimestepEmbedder(d // 3, scale=1.0, rngs=rngs, dtype=dtype)
    self.t_block = (primitives.Linear(d, 6 * d, ("embed", "modulation"), kernel_init=nnx.initializers.normal(0.02),
                                      rngs=rngs, dtype=dtype) if m.conditioning == "adaln_single" else None)
    self.context_embed = embeddings.ContextEmbedder(m.context_dim, d, rngs=rngs, dtype=dtype)
    # Optional: the masked mean of the text joins the timestep in the adaLN conditioning
    # (as SD3/Imagen do), so every block is modulated by the prompt, not only through
    # cross-attention. Off in the paper configs (PixArt-alpha has no pooled path).
    self.pooled_embed = (primitives.Linear(d, d, ("embed", "mlp"), rngs=rngs, dtype=dtype)
                         if m.pooled_text_conditioning else None)
    self.blocks = nnx.List([DiTBlock(i, m, rngs=rngs, dtype=dtype) for i in range(m.depth)])
    # Optional U-ViT long skips (Bao et al. 2023): the outputs of the first n blocks are
    # concatenated, in reverse order, to the inputs of the last n and projected back to d.
    # They carry fine spatial detail past the middle of the network, which speeds up
    # pixel-space training. Initialised so that the model starts as the plain DiT.
    self.skip_proj = (nnx.List([primitives.Linear(2 * d, d, ("mlp", "embed"), kernel_init=_keep_first_half,
                                          rngs=rngs, dtype=dtype) for _ in range(num_long_skips(m.depth))])
                      if m.long_skips else None)
    self.out_channels = m.in_channels * (2 if m.learn_sigma else 1)
    self.final = FinalLayer(d, m.patch_size, self.out_channels, rngs=rngs, dtype=dtype,
                            single=m.conditioning == "adaln_single")
    self.dtype = dtype

  def encode_context(self, context: jax.Array, context_mask: jax.Array) -> ContextCache:
    """Projects the text and computes every block's cross-attention K/V once."""
    ctx = self.context_embed(context)
    mask = context_mask.astype(bool)
    pooled = None
    if self.pooled_embed is not None:
      weights = mask.astype(ctx.dtype)[..., None]
      pooled = jnp.sum(ctx * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
      # Normalised so its scale (and so its gradient) does not shrink with averaging;
      # the empty prompt stays exactly zero.
      pooled = primitives.layer_norm(pooled) * jnp.any(mask, axis=1, keepdims=True).astype(ctx.dtype)
    return ContextCache(tuple(block.cross_attn.text_kv(ctx) for block in self.blocks), mask, pooled)

  def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array | None = None,
               context_mask: jax.Array | None = None, *, context_cache: ContextCache | None = None,
               micro: tuple[jax.Array, jax.Array] | None = None):
    if context_cache is None:
      if context is None or context_mask is None:
        raise ValueError("DiT needs context and context_mask, or a context_cache")
      context_cache = self.encode_context(context, context_mask)
    m = self.config
    b, height, width, channels = x.shape
    grid = height // m.patch_size
    h = self.patch_embed(x) + self._positions(grid, width // m.patch_size).astype(self.dtype)
    c = self.t_embed(t)
    if m.micro_conditions:
      c = c + self._micro(x, micro)
    if self.pooled_embed is not None:
      c = c + self.pooled_embed(jax.nn.silu(context_cache.pooled))
    c_final = c
    if self.t_block is not None:  # adaLN-single: the blocks get t_block(silu(c)), the final layer c
      c = self.t_block(jax.nn.silu(c))
    policy = REMAT_POLICY_OF[m.remat_policy]
    moe, aux_loss = {}, jnp.zeros((), jnp.float32)
    skips, n_skip = [], (len(self.skip_proj) if self.skip_proj is not None else 0)
    for i, (block, kv) in enumerate(zip(self.blocks, context_cache.kv)):
      if i >= m.depth - n_skip:
        h = self.skip_proj[i - (m.depth - n_skip)](jnp.concatenate([h, skips.pop()], axis=-1))
      if policy is not None:
        h, diagnostics = nnx.remat(lambda blk, *a: blk(*a), policy=policy)(block, h, c, kv, context_cache.mask)
      else:
        h, diagnostics = block(h, c, kv, context_cache.mask)
      if i < n_skip:
        skips.append(h)
      if diagnostics:
        moe[f"layer_{i:02d}"] = diagnostics
        aux_loss = aux_loss + m.ffn.router_z_loss_coef * diagnostics["router_z_loss"]
        if "balance_loss" in diagnostics:
          aux_loss = aux_loss + m.ffn.balance_loss_coef * diagnostics["balance_loss"]
    out = embeddings.unpatchify(self.final(h, c_final), m.patch_size, height, width,
                                self.out_channels).astype(jnp.float32)
    if m.prediction == "x0":
      t_safe = jnp.maximum(t.astype(jnp.float32), X0_MIN_T)[:, None, None, None]
      out = (x.astype(jnp.float32) - out) / t_safe
    return out, {"aux_loss": aux_loss, "moe": moe}

  def _positions(self, grid_h: int, grid_w: int):
    m = self.config
    if m.positions == "pixart":
      return embeddings.pixart_positions(m.hidden_size, grid_h, grid_w, m.input_size // m.patch_size,
                                         m.pos_interpolation_scale)
    return embeddings.sincos_2d(m.hidden_size, grid_h, grid_w)

  def _micro(self, x: jax.Array, micro) -> jax.Array:
    """PixArt-alpha's size conditioning [B, d]: embeddings of height, width (d/3 each) and aspect ratio."""
    b = x.shape[0]
    if micro is None:
      size = jnp.asarray([x.shape[1] * VAE_SCALE, x.shape[2] * VAE_SCALE], jnp.float32)
      micro = (jnp.broadcast_to(size, (b, 2)), jnp.full((b, 1), x.shape[1] / x.shape[2], jnp.float32))
    resolution, aspect = (jnp.asarray(a, jnp.float32) for a in micro)
    r = self.resolution_embed(resolution.reshape(-1)).reshape(b, -1)
    a = self.aspect_embed(aspect.reshape(-1)).reshape(b, -1)
    return jnp.concatenate([r, a], axis=-1)
