"""Feed-forward layers: dense MLP, expert-choice MoE (EC-DiT), token-choice MoE (DiT-MoE).

Every FFN is called as `ffn(x, router_input) -> (y, diagnostics)` with x and
router_input [B, S, D]; dense layers ignore router_input and return no
diagnostics. Diagnostics are a flat dict of arrays, recorded per layer by the
model (see `moe_diagnostics`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ec_dit import primitives, sharding
from ec_dit.moe import dispatch as dispatch_lib
from ec_dit.moe import grouped, routing

_expert_init = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform", batch_axis=(0,))
_router_init = nnx.initializers.normal(stddev=0.02)


class DenseMLP(nnx.Module):
  """Position-wise MLP: GELU (DiT) or SwiGLU, hidden width `hidden`."""

  def __init__(self, d: int, hidden: int, *, activation: str = "gelu", rngs: nnx.Rngs,
               dtype=jnp.float32):
    self.activation = activation
    self.wi = primitives.Linear(d, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype)
    self.wg = primitives.Linear(d, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype) if activation == "swiglu" else None
    self.wo = primitives.Linear(hidden, d, ("mlp", "embed"), rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array, router_input: jax.Array | None = None):
    # On rows [N, D]: with [B, S, D] the weight gradients contract over (b, s) at
    # once and XLA transposes the hidden-width gradients to merge them (see `Experts`).
    x_nd = x.reshape(-1, x.shape[-1])
    if self.activation == "swiglu":
      h = jax.nn.silu(self.wg(x_nd)) * self.wi(x_nd)
    else:
      h = primitives.gelu(self.wi(x_nd))
    y = self.wo(h)
    return y.reshape(x.shape[:-1] + y.shape[-1:]), {}


def _swiglu(u, g):
  return jax.nn.silu(g) * u


def _gelu(u, g):
  del g
  return primitives.gelu(u)


_ACTIVATION_OF = {"swiglu": _swiglu, "gelu": _gelu}  # activation(x @ wi + bi, x @ wg) of an expert


class Experts(nnx.Module):
  """E expert MLPs stored stacked: wi [E, D, H], wo [E, H, D] (biases bi, bo unless `use_bias=False`).

  Logical axes ('expert', 'embed', 'expert_mlp') let the sharding rules put
  experts on the `expert` mesh axis and their hidden width on `tensor`.
  """

  def __init__(self, num_experts: int, d: int, hidden: int, *, activation: str = "gelu",
               use_bias: bool = True, rngs: nnx.Rngs, dtype=jnp.float32):
    self.activation = activation
    self.dtype = dtype
    e = num_experts

    def bias(shape, axes):
      return primitives.param(rngs, primitives.zeros_init, shape, axes) if use_bias else None

    self.wi = primitives.param(rngs, _expert_init, (e, d, hidden), ("expert", "embed", "expert_mlp"))
    self.bi = bias((e, hidden), ("expert", "expert_mlp"))
    self.wg = (primitives.param(rngs, _expert_init, (e, d, hidden), ("expert", "embed", "expert_mlp"))
               if activation == "swiglu" else None)
    self.wo = primitives.param(rngs, _expert_init, (e, hidden, d), ("expert", "expert_mlp", "embed"))
    self.bo = bias((e, d), ("expert", "embed"))

  def _w(self, p):
    return p[...].astype(self.dtype)

  def _b(self, p, index):
    """Bias `p` indexed by `index`, or 0 when the experts have no biases."""
    return 0.0 if p is None else self._w(p)[index]

  def __call__(self, x_gecd: jax.Array) -> jax.Array:
    """Each expert e runs on its own slots: [G, E, C, D] -> [G, E, C, D]."""
    # Compute expert-major: with E leading, every batched matmul (and its
    # gradients) sees contiguous [G*C, D] / [G*C, H] operands per expert. In
    # the [G, E, C, H] layout XLA inserts transposes of the hidden-width
    # activations (the largest tensors here) around each matmul. The two
    # transposes below are of D-width tensors only, and cancel against the
    # dispatch's own transposes.
    #
    # Sharding (under `sharding.activation_sharding`, a no-op otherwise): the
    # dispatched slots move to the devices holding their experts (E over `expert`,
    # groups over the remaining batch axes): XLA emits the all-to-all here and
    # its inverse on the way out.
    x_gecd = sharding.constrain(x_gecd, ("expert_group", "expert", None, None))
    g, e, c, d = x_gecd.shape
    # Rows [E, G*C]: every matmul is a batched dot with ONE contracting dim. In
    # the 4-D form the weight gradients contract over (g, c) at once, and XLA
    # then transposes the [.., H]-wide activation gradients (fused with the
    # SwiGLU backward, strided; docs/benchmarks.md, "MoE code paths") to merge them.
    x_end = jnp.swapaxes(x_gecd.astype(self.dtype), 0, 1).reshape(e, g * c, d)
    u_enh = jnp.einsum("end,edh->enh", x_end, self._w(self.wi)) + self._b(self.bi, (slice(None), None))
    g_enh = None if self.wg is None else jnp.einsum("end,edh->enh", x_end, self._w(self.wg))
    h_enh = _ACTIVATION_OF[self.activation](u_enh, g_enh)
    h_egch = sharding.constrain(h_enh.reshape(e, g, c, -1), ("expert", "expert_group", None, "expert_mlp"))
    y_end = jnp.einsum("enh,ehd->end", h_egch.reshape(e, g * c, -1), self._w(self.wo))
    y_egcd = (y_end + self._b(self.bo, (slice(None), None))).reshape(e, g, c, d)
    return sharding.constrain(jnp.swapaxes(y_egcd, 0, 1), ("expert_group", "expert", None, None))

  def ragged(self, x_nd: jax.Array, expert_of_row: jax.Array, group_sizes: jax.Array,
             impl: str = "auto") -> jax.Array:
    """Rows sorted by expert, `group_sizes[e]` rows for expert e: [N, D] -> [N, D], no row dropped.

    `impl` (see `ec_dit.moe.grouped`): "ragged_dot" (grouped matmuls; a kernel on
    TPU, every expert on every row elsewhere), "tiles" (a loop over each expert's rows in
    tiles, cost follows the rows) or "auto" (ragged_dot on TPU, tiles elsewhere).
    """
    x_nd = x_nd.astype(self.dtype)
    if grouped.resolve_impl(impl) == "ragged_dot":
      return self._mlp(x_nd, lambda a, w: jax.lax.ragged_dot(a, w, group_sizes), expert_of_row)
    params = {name: None if getattr(self, name) is None else self._w(getattr(self, name))
              for name in ("wi", "wg", "wo", "bi", "bo")}
    tiles = grouped.tile_sizes(x_nd.shape[0], group_sizes.shape[0])
    return grouped.tile_mlp(x_nd, group_sizes, tiles, params, _ACTIVATION_OF[self.activation])

  def _mlp(self, x, matmul, bias_index):
    """The expert MLP with `matmul(x, w_stacked)` picking each row's expert and biases `b[bias_index]`."""
    u = matmul(x, self._w(self.wi)) + self._b(self.bi, bias_index)
    h = _ACTIVATION_OF[self.activation](u, None if self.wg is None else matmul(x, self._w(self.wg)))
    return matmul(h, self._w(self.wo)) + self._b(self.bo, bias_index)


def _to_groups(x: jax.Array, group_size: int) -> jax.Array:
  """[B, S, D] -> [G, group, D]. group_size 0 means one group per image, -1 one group of the
  whole batch's B * S tokens (EC-DiT's setting: compute can move between images).

  Groups are whole images or fixed runs of tokens, never "the tokens on this
  device": routing does not depend on how the batch is split over devices. The
  groups are split over the batch mesh axes (`sharding.constrain`).
  """
  b, s, d = x.shape
  if group_size == -1:
    return x.reshape(1, b * s, d)
  if group_size == 0 or group_size == s:
    return sharding.constrain(x, ("batch", None, None))
  if (b * s) % group_size:
    raise ValueError(f"routing_group_size={group_size} must divide batch*tokens={b}*{s}")
  return sharding.constrain(x.reshape(b * s // group_size, group_size, d), ("batch", None, None))


class Router(nnx.Module):
  """The router of EC-DiT: S = softmax(X W_g), in float32.

  `router(x_gsd)` gives the logits X W_g [G, S, E] (W_g [D, E], no bias, float32);
  `router.route(x, router_input, group_size)` groups the tokens and returns
  (x_gsd, logits, S) with S = `routing.router_probabilities(logits)`.
  """

  def __init__(self, d: int, num_experts: int, *, rngs: nnx.Rngs):
    self.proj = primitives.Linear(d, num_experts, ("embed", "unmodeled"), use_bias=False,
                          kernel_init=_router_init, rngs=rngs, dtype=jnp.float32)

  def __call__(self, router_input_gsd: jax.Array) -> jax.Array:
    return self.proj(router_input_gsd.astype(jnp.float32))

  def route(self, x: jax.Array, router_input: jax.Array, group_size: int):
    """Groups tokens and router inputs; returns (x_gsd, logits, float32 probs)."""
    logits = self(_to_groups(router_input, group_size))
    return _to_groups(x, group_size), logits, routing.router_probabilities(logits)


def _run_slots(method: str, x_gsd, slots, experts):
  """Runs the experts on their slots; returns (y_gsd, experts per token [G, S], usage [E])."""
  y_gsd = dispatch_lib.dispatch_tokens(method, x_gsd, slots, experts)
  counts = dispatch_lib.experts_per_token(slots, x_gsd.shape[1])
  return y_gsd, counts, jnp.sum(slots.valid.astype(jnp.float32), axis=(0, 2))


def _chosen(slots, shape_gse):
  """[G, S, E]: 1 where expert e holds token s in a (valid) slot."""
  g_idx, e_idx = jnp.arange(shape_gse[0])[:, None, None], jnp.arange(shape_gse[2])[None, :, None]
  return jnp.zeros(shape_gse, jnp.float32).at[g_idx, slots.token_indices, e_idx].add(slots.valid.astype(jnp.float32))


def _common_diagnostics(logits, probs, per_token_experts, usage, batch_shape, chosen):
  """Diagnostics shared by both routers.

  per_token_experts: [G, S] routed experts per token; usage: [E] tokens each expert processed;
  chosen: [G, S, E] 1 where expert e processed token s, reported per image as `expert_choices`
  [B, S, E] (for routing maps and specialisation; unused outputs cost nothing under jit).
  """
  return {
      "experts_per_token": per_token_experts.reshape(batch_shape),
      "expert_choices": chosen.reshape(batch_shape + chosen.shape[-1:]),
      "expert_usage": usage / jnp.maximum(jnp.sum(usage), 1.0),
      "router_prob_per_expert": jnp.mean(probs.reshape(-1, probs.shape[-1]), axis=0),
      "router_z_loss": routing.router_z_loss(logits),
      "dropped_fraction": jnp.mean((per_token_experts == 0).astype(jnp.float32)),
      "mean_top_gate": jnp.mean(jnp.max(probs, axis=-1)),
  }


def _init_routed(layer: nnx.Module, d, num_experts, hidden, dispatch, group_size, activation, rngs, dtype,
                 expert_bias=True):
  """What both MoE kinds hold: E experts behind a router, a dispatch method and a routing group size."""
  layer.num_experts = num_experts
  layer.dispatch = dispatch
  layer.group_size = group_size
  layer.router = Router(d, num_experts, rngs=rngs)
  layer.experts = Experts(num_experts, d, hidden, activation=activation, use_bias=expert_bias, rngs=rngs,
                          dtype=dtype)


class ExpertChoiceMoE(nnx.Module):
  """EC-DiT's expert-choice MoE: in each routing group, every expert takes its top-C tokens.

  y[token] = sum over experts e that took the token of gate[e, token] * expert_e(x[token]).
  A token no expert took gets y = 0 and passes through on the block's residual.
  C = round(group_tokens * capacity_factor / E): `train_capacity_factor` while
  training, `eval_capacity_factor` after `model.eval()`. No auxiliary loss is
  needed: every expert is exactly full by construction.
  """

  def __init__(self, d: int, *, num_experts: int, hidden: int, train_capacity_factor: float = 2.0,
               eval_capacity_factor: float = 2.0, dispatch: str = "einsum", group_size: int = 0,
               activation: str = "gelu", expert_bias: bool = True, rngs: nnx.Rngs, dtype=jnp.float32):
    _init_routed(self, d, num_experts, hidden, dispatch, group_size, activation, rngs, dtype, expert_bias)
    self.train_capacity_factor = train_capacity_factor
    self.eval_capacity_factor = eval_capacity_factor
    self.deterministic = False

  def capacity(self, group_tokens: int) -> int:
    cf = self.eval_capacity_factor if self.deterministic else self.train_capacity_factor
    return routing.capacity(group_tokens, cf, self.num_experts)

  def __call__(self, x: jax.Array, router_input: jax.Array):
    x_gsd, logits, probs = self.router.route(x, router_input, self.group_size)
    slots = routing.expert_choice_slots(probs, self.capacity(x_gsd.shape[1]))
    y_gsd, counts, usage = _run_slots(self.dispatch, x_gsd, slots, self.experts)
    diagnostics = _common_diagnostics(logits, probs, counts, usage, x.shape[:2], _chosen(slots, probs.shape))
    return y_gsd.reshape(x.shape).astype(x.dtype), diagnostics


class TokenChoiceMoE(nnx.Module):
  """DiT-MoE's token-choice MoE: each token picks its top-k experts, plus always-on shared experts.

  Dropless by default (`capacity_factor=0`): rows are sorted by expert and run as
  grouped matmuls (`Experts.ragged` with `dropless_impl`: "auto", "ragged_dot" or
  "tiles", see `ec_dit.moe.grouped`), so no token is ever dropped. With
  `capacity_factor > 0` each expert holds C = round(S * k * capacity_factor / E)
  slots per group and overflowing choices are dropped. Gates are the raw top-k
  probabilities unless `renormalize_gates`. The layer reports DiT-MoE's
  expert-level balance loss (uncoefficiented) in its diagnostics.
  """

  def __init__(self, d: int, *, num_experts: int, hidden: int, k: int = 2, num_shared_experts: int = 0,
               capacity_factor: float = 0.0, renormalize_gates: bool = False, dispatch: str = "einsum",
               group_size: int = 0, activation: str = "gelu", expert_bias: bool = True,
               dropless_impl: str = "auto", rngs: nnx.Rngs, dtype=jnp.float32):
    grouped.resolve_impl(dropless_impl)  # a ValueError now rather than at the first call
    _init_routed(self, d, num_experts, hidden, dispatch, group_size, activation, rngs, dtype, expert_bias)
    self.k = k
    self.capacity_factor = capacity_factor
    self.renormalize_gates = renormalize_gates
    self.dropless_impl = dropless_impl
    self.shared = nnx.List([DenseMLP(d, hidden, activation=activation, rngs=rngs, dtype=dtype)
                            for _ in range(num_shared_experts)])

  def _dropless(self, x_gsd, gates_gsk, experts_gsk):
    g, s, d = x_gsd.shape
    rows_expert = experts_gsk.reshape(-1)
    rows_token = jnp.repeat(jnp.arange(g * s), self.k)
    order = jnp.argsort(rows_expert, stable=True)
    group_sizes = jnp.bincount(rows_expert, length=self.num_experts).astype(jnp.int32)
    y_sorted = self.experts.ragged(x_gsd.reshape(g * s, d)[rows_token[order]], rows_expert[order], group_sizes,
                                   impl=self.dropless_impl)
    y_rows = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(g, s, self.k, d)
    y_gsd = jnp.einsum("gskd,gsk->gsd", y_rows.astype(x_gsd.dtype), gates_gsk.astype(x_gsd.dtype))
    return y_gsd, jnp.full((g, s), float(self.k)), group_sizes.astype(jnp.float32)

  def __call__(self, x: jax.Array, router_input: jax.Array):
    x_gsd, logits, probs = self.router.route(x, router_input, self.group_size)
    gates_gsk, experts_gsk = routing.token_choice(probs, self.k)
    if self.renormalize_gates:
      gates_gsk = gates_gsk / jnp.sum(gates_gsk, axis=-1, keepdims=True)
    if self.capacity_factor > 0:
      c = routing.capacity(x_gsd.shape[1] * self.k, self.capacity_factor, self.num_experts)
      slots = routing.token_choice_slots(gates_gsk, experts_gsk, self.num_experts, c)
      y_gsd, counts, usage = _run_slots(self.dispatch, x_gsd, slots, self.experts)
      chosen = _chosen(slots, probs.shape)
    else:
      y_gsd, counts, usage = self._dropless(x_gsd, gates_gsk, experts_gsk)
      chosen = jnp.sum(jax.nn.one_hot(experts_gsk, self.num_experts), axis=2)
    y = y_gsd.reshape(x.shape).astype(x.dtype)
    for shared in self.shared:
      y = y + shared(x)[0]
    diagnostics = _common_diagnostics(logits, probs, counts, usage, x.shape[:2], chosen)
    diagnostics["balance_loss"] = routing.balance_loss(probs, experts_gsk, self.num_experts)
    return y, diagnostics
