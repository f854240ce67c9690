"""DiT-MoE (Fei et al. 2024, arXiv 2407.11633): the class-conditional DiT of feizc/DiT-MoE's `models.py`.

    x = patch_embed(x) + pos                      # fixed 2-D sin-cos positions (DiT's layout)
    c = t_embed(t) + y_embed(y)                   # raw timesteps (DDPM: 0..999; its RF: t in [0, 1])
    per block (every block has an MoE FFN):
      x = x + gate1 * Attn(modulate(LN(x), shift1, scale1))          # qkv with bias
      h = modulate(LN(x), shift2, scale2)
      x = x + gate2 * (MoE(h) + SharedExpert(h))                     # the gate sees h
    out = Linear(modulate(LN(x), shift, scale))   # 2C channels with learned sigma

MoE (DiT-MoE's `SparseMoeBlock`): softmax gate (weight [E, d], no bias), top-k
gates without renormalisation, bias-free SwiGLU experts of width
`int(mlp_ratio * d)`, one shared bias-free SwiGLU expert of width
`num_shared_experts * d` (DiT-MoE's `n_shared_experts = 2`), and the
expert-level balance loss (coefficient `ffn.balance_loss_coef`, 0.01) while
training only (`model.eval()` drops it, as the reference's `self.training`).
With `ffn.kind = "expert_choice"` the same network routes by expert choice.

DiT itself (facebookresearch/DiT, `ec_dit.convert.dit`) is `class_cond.ffn_style =
"dit"`: each block's FFN is DiT's biased GELU-tanh MLP of width `mlp_ratio * d`
(`ffn.kind = "dense"`), or, at the MoE positions (`ffn.moe_every`,
`ffn.dense_first_n`, as the text-to-image DiT), an expert-choice or token-choice
MoE of such experts (an upcycled DiT). `class_cond.timestep_shift = 1` and
`mlp_norm_eps = 1e-5` reproduce diffusers' DiT port (`DiTTransformer2DModel`).

Labels: index `num_classes` is the null class. The model never draws random
numbers: label dropout for guidance is the caller's `drop_mask` (see
`ec_dit.diffusion.class_labels`), so losses and tests control it exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ec_dit import primitives
from ec_dit.model import attention, dit, embeddings
from ec_dit.moe import layers as moe_layers


def dit_pos_embed(embed_dim: int, grid: int) -> np.ndarray:
  """DiT/MAE's `get_2d_sincos_pos_embed` [grid*grid, D]: the first half encodes the column, the second the row.

  (`embeddings.sincos_2d` puts the row first; the imported weights need DiT's order.)
  """
  e = embeddings.sincos_2d(embed_dim, grid, grid)
  return np.concatenate([e[:, embed_dim // 2:], e[:, :embed_dim // 2]], axis=1)


class RawTimestepEmbedder(embeddings.TimestepEmbedder):
  """DiT's TimestepEmbedder: sinusoidal features of t as given (no x1000), then a SiLU MLP.

  `shift` is diffusers' `downscale_freq_shift` (1 in its DiT port, 0 in DiT).
  """

  def __init__(self, d: int, *, shift: int = 0, rngs: nnx.Rngs, dtype=jnp.float32):
    super().__init__(d, rngs=rngs, dtype=dtype)
    self.shift = shift

  def __call__(self, t: jax.Array) -> jax.Array:
    features = embeddings.timestep_features(t, self.frequency_dim, scale=1.0, shift=self.shift)
    return self.fc2(jax.nn.silu(self.fc1(features)))


class LabelEmbedder(nnx.Module):
  """Class labels -> [B, D]; the table has a last row for the null class when class_dropout > 0."""

  def __init__(self, num_classes: int, d: int, class_dropout: float, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.num_classes = num_classes
    self.dtype = dtype
    rows = num_classes + int(class_dropout > 0)
    self.table = primitives.param(rngs, nnx.initializers.normal(0.02), (rows, d), ("vocab", "embed"))

  def __call__(self, labels: jax.Array, drop_mask: jax.Array | None = None) -> jax.Array:
    if drop_mask is not None:
      labels = jnp.where(drop_mask, self.num_classes, labels)
    return jnp.take(self.table[...], labels, axis=0).astype(self.dtype)


class Attention(nnx.Module):
  """Self-attention as timm's `Attention` (qkv and proj with bias) or, with `qk_norm`, DiT-MoE's
  flash-attention module (its XL/2 and G/2): LayerNorm with affine on q and k per head."""

  def __init__(self, d: int, num_heads: int, *, qk_norm: bool = False, rngs: nnx.Rngs, dtype=jnp.float32):
    self.num_heads = num_heads
    self.qkv = primitives.Linear(d, 3 * d, ("embed", "heads"), rngs=rngs, dtype=dtype)
    self.proj = primitives.Linear(d, d, ("heads", "embed"), rngs=rngs, dtype=dtype)
    hd = d // num_heads
    ones, zeros = nnx.initializers.ones_init(), primitives.zeros_init
    make = lambda init: primitives.param(rngs, init, (hd,), ("unmodeled",)) if qk_norm else None  # noqa: E731
    self.q_scale, self.q_bias, self.k_scale, self.k_bias = make(ones), make(zeros), make(ones), make(zeros)

  def _norm(self, x, scale, bias):
    if scale is None:
      return x
    return (primitives.layer_norm(x) * scale[...] + bias[...]).astype(x.dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, s, d = x.shape
    q, k, v = (a.reshape(b, s, self.num_heads, d // self.num_heads) for a in jnp.split(self.qkv(x), 3, axis=-1))
    q, k = self._norm(q, self.q_scale, self.q_bias), self._norm(k, self.k_scale, self.k_bias)
    return self.proj(attention.attend(q, k, v))


class SwiGLU(nnx.Module):
  """DiT-MoE's `MoeMLP`: down(silu(gate(x)) * up(x)), no biases."""

  def __init__(self, d: int, hidden: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.gate = primitives.Linear(d, hidden, ("embed", "mlp"), use_bias=False, rngs=rngs, dtype=dtype)
    self.up = primitives.Linear(d, hidden, ("embed", "mlp"), use_bias=False, rngs=rngs, dtype=dtype)
    self.down = primitives.Linear(hidden, d, ("mlp", "embed"), use_bias=False, rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    # On rows [N, D], as `moe_layers.DenseMLP`: no transposed weight-gradient operands.
    x_nd = x.reshape(-1, x.shape[-1])
    return self.down(jax.nn.silu(self.gate(x_nd)) * self.up(x_nd)).reshape(x.shape)


class SparseMoE(nnx.Module):
  """DiT-MoE's `SparseMoeBlock`: routed bias-free SwiGLU experts plus one shared SwiGLU expert.

  `ffn.kind` picks the router: "token_choice" (DiT-MoE: top-k, dropless unless
  `token_capacity_factor`) or "expert_choice" (EC-DiT). "dense" is the baseline
  at matched compute: one bias-free SwiGLU of width `ffn.dense_mlp_ratio * d` and
  no router (e.g. 10d = two routed 4d experts plus the 2d shared one); its
  diagnostics are empty. Returns (y, diagnostics).
  """

  def __init__(self, model_config, *, rngs: nnx.Rngs, dtype=jnp.float32):
    m, f = model_config, model_config.ffn
    d = m.hidden_size
    common = dict(num_experts=f.num_experts, hidden=int(m.mlp_ratio * d), dispatch=f.dispatch,
                  group_size=f.routing_group_size, activation="swiglu", expert_bias=False, rngs=rngs, dtype=dtype)
    if f.kind == "dense":
      self.routed, self.shared = None, SwiGLU(d, int(f.dense_mlp_ratio * d), rngs=rngs, dtype=dtype)
      return
    if f.kind == "token_choice":
      self.routed = moe_layers.TokenChoiceMoE(d, k=f.top_k, num_shared_experts=0,
                                              capacity_factor=f.token_capacity_factor,
                                              renormalize_gates=f.renormalize_gates,
                                              dropless_impl=f.dropless_impl, **common)
    elif f.kind == "expert_choice":
      self.routed = moe_layers.ExpertChoiceMoE(d, train_capacity_factor=f.train_capacity_factor,
                                               eval_capacity_factor=f.eval_capacity_factor, **common)
    else:
      raise ValueError(f"config.model.ffn.kind: must be token_choice, expert_choice or dense for DiT-MoE, got {f.kind!r}")
    n = f.num_shared_experts
    self.shared = SwiGLU(d, n * d, rngs=rngs, dtype=dtype) if n > 0 else None

  def __call__(self, x: jax.Array):
    if self.routed is None:
      return self.shared(x), {}
    y, diagnostics = self.routed(x, x)
    if self.shared is not None:
      y = y + self.shared(x)
    return y, diagnostics


def dit_ffn(index: int, model_config, *, rngs: nnx.Rngs, dtype=jnp.float32):
  """DiT's FFN at layer `index` (`ffn_style="dit"`): its GELU MLP, or an MoE of GELU experts at the MoE positions."""
  m, f = model_config, model_config.ffn
  d, hidden = m.hidden_size, int(m.mlp_ratio * m.hidden_size)
  if f.kind == "dense" or not dit.is_moe_layer(index, f):
    return moe_layers.DenseMLP(d, hidden, activation="gelu", rngs=rngs, dtype=dtype)
  common = dict(num_experts=f.num_experts, hidden=hidden, dispatch=f.dispatch, group_size=f.routing_group_size,
                activation="gelu", rngs=rngs, dtype=dtype)
  if f.kind == "expert_choice":
    return moe_layers.ExpertChoiceMoE(d, train_capacity_factor=f.train_capacity_factor,
                                      eval_capacity_factor=f.eval_capacity_factor, **common)
  return moe_layers.TokenChoiceMoE(d, k=f.top_k, capacity_factor=f.token_capacity_factor,
                                   renormalize_gates=f.renormalize_gates, dropless_impl=f.dropless_impl, **common)


class DiTMoEBlock(nnx.Module):
  """adaLN-Zero block: self-attention and the MoE FFN (`moe`; DiT's FFN `mlp` with ffn_style="dit"), each gated."""

  def __init__(self, model_config, *, rngs: nnx.Rngs, dtype=jnp.float32, index: int = 0):
    d, c = model_config.hidden_size, model_config.class_cond
    self.adaln = primitives.Linear(d, 6 * d, ("embed", "modulation"), kernel_init=primitives.zeros_init,
                                   rngs=rngs, dtype=dtype)
    self.attn = Attention(d, model_config.num_heads, qk_norm=c.qk_norm, rngs=rngs, dtype=dtype)
    self.mlp_norm_eps = c.mlp_norm_eps
    if c.ffn_style == "dit":
      self.moe, self.mlp = None, dit_ffn(index, model_config, rngs=rngs, dtype=dtype)
    else:
      self.moe, self.mlp = SparseMoE(model_config, rngs=rngs, dtype=dtype), None

  def __call__(self, x: jax.Array, c: jax.Array):
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(self.adaln(jax.nn.silu(c)), 6, axis=-1)
    x = x + gate1[:, None] * self.attn(primitives.modulate(primitives.layer_norm(x), shift1, scale1))
    h = primitives.modulate(primitives.layer_norm(x, self.mlp_norm_eps), shift2, scale2)
    y, diagnostics = self.moe(h) if self.mlp is None else self.mlp(h, h)
    return x + gate2[:, None] * y, diagnostics


class DiTMoE(nnx.Module):
  """The class-conditional DiT-MoE network.

  Call: `out, aux = model(x_t, t, labels, drop_mask=None)` with x_t [B, H, W, C],
  t [B] raw timesteps, labels [B] int in [0, num_classes] and an optional bool
  drop_mask [B] (True = replace the label by the null class). `out` is
  [B, H, W, 2C] with learned sigma (noise first, then the variance values),
  else [B, H, W, C], float32. `aux` holds "aux_loss" (balance and z losses with
  their coefficients; the balance loss only in training mode) and "moe", every
  block's router diagnostics.
  """

  def __init__(self, model_config, *, rngs: nnx.Rngs):
    m = ml_collections.FrozenConfigDict(model_config)
    self.config = m
    dtype = primitives.compute_dtype(m.dtype)
    d, c = m.hidden_size, m.class_cond
    self.out_channels = m.in_channels * (2 if c.learn_sigma else 1)
    self.patch_embed = embeddings.PatchEmbed(m.patch_size, m.in_channels, d, rngs=rngs, dtype=dtype)
    self.t_embed = RawTimestepEmbedder(d, shift=c.timestep_shift, rngs=rngs, dtype=dtype)
    self.y_embed = LabelEmbedder(c.num_classes, d, c.class_dropout, rngs=rngs, dtype=dtype)
    self.blocks = nnx.List([DiTMoEBlock(m, rngs=rngs, dtype=dtype, index=i) for i in range(m.depth)])
    self.final = dit.FinalLayer(d, m.patch_size, self.out_channels, rngs=rngs, dtype=dtype)
    self.dtype = dtype
    self.deterministic = False  # `model.eval()` sets it: no balance loss, eval capacity for expert choice

  def __call__(self, x: jax.Array, t: jax.Array, labels: jax.Array, *, drop_mask: jax.Array | None = None):
    m = self.config
    b, height, width, _ = x.shape
    grid = height // m.patch_size
    if height != width:
      raise ValueError(f"DiT-MoE takes square inputs, got {height}x{width}")
    h = self.patch_embed(x) + jnp.asarray(dit_pos_embed(m.hidden_size, grid), self.dtype)
    c = self.t_embed(t) + self.y_embed(labels, drop_mask)
    policy = dit.REMAT_POLICY_OF[m.remat_policy]
    moe, aux_loss = {}, jnp.zeros((), jnp.float32)
    for i, block in enumerate(self.blocks):
      if policy is not None:
        h, diagnostics = nnx.remat(lambda blk, *a: blk(*a), policy=policy)(block, h, c)
      else:
        h, diagnostics = block(h, c)
      if not diagnostics:  # a dense FFN
        continue
      moe[f"layer_{i:02d}"] = diagnostics
      aux_loss = aux_loss + m.ffn.router_z_loss_coef * diagnostics["router_z_loss"]
      if "balance_loss" in diagnostics and not self.deterministic:
        aux_loss = aux_loss + m.ffn.balance_loss_coef * diagnostics["balance_loss"]
    out = embeddings.unpatchify(self.final(h, c), m.patch_size, height, width, self.out_channels)
    return out.astype(jnp.float32), {"aux_loss": aux_loss, "moe": moe}


def build(config, *, seed: int | None = None) -> DiTMoE:
  """The DiT-MoE network of a whole config (`config.model.arch == "dit_moe"`), initialised."""
  return DiTMoE(config.model, rngs=nnx.Rngs(config.seed if seed is None else seed))


def abstract_model(config, *, seed: int = 0) -> DiTMoE:
  """The DiT-MoE network of `config` with ShapeDtypeStructs in place of arrays (nothing allocated)."""
  return nnx.eval_shape(lambda: DiTMoE(config.model, rngs=nnx.Rngs(seed)))


def abstract_params(config) -> dict:
  """ShapeDtypeStructs of the DiT-MoE parameters as a pure dict (checkpoint targets, converter)."""
  return nnx.to_pure_dict(nnx.state(abstract_model(config), nnx.Param))


def count_params(config) -> int:
  """Number of parameters of the DiT-MoE network, from shapes only."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract_params(config))))
