"""Moving tokens to expert slots and back: two implementations, same numbers.

* `einsum`: one-hot dispatch and combine tensors [G, E, C, S] contracted with
  einsums (EC-DiT's Algorithm 1). Dense matmuls that suit a TPU's MXU at short
  sequences, but the one-hot tensors grow as S * E * C = S^2 * capacity_factor.
* `gather`: index the slots' tokens directly and scatter-add the weighted
  outputs back. Linear in S, so cheaper at long sequences.

Both take tokens `x_gsd` [G, S, D], a `SlotAssignment` and an expert function
mapping [G, E, C, D] -> [G, E, C, D], and return the combined output [G, S, D]
(zero for tokens no slot holds).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ec_dit import schema
from ec_dit.moe.routing import SlotAssignment

ExpertFn = Callable[[jax.Array], jax.Array]
DISPATCH_METHODS = schema.DISPATCHES


def dispatch_einsum(x_gsd: jax.Array, slots: SlotAssignment, expert_fn: ExpertFn) -> jax.Array:
  """One-hot einsum dispatch and combine (EC-DiT Algorithm 1).

  The gates multiply the expert outputs [G, E, C, D] rather than the one-hot
  tensor (combine = dispatch * gates in the paper): the products are the same,
  but the backward pass then needs no [G, E, C, S] gradient of the combine
  tensor (one O(S^2 D) matmul fewer) and no second [G, E, C, S] tensor is built.
  Empty slots get token index -1, whose one-hot row is all zeros.
  """
  g, num_tokens, d = x_gsd.shape
  e, c = slots.token_indices.shape[1:]
  # Slots flattened to n = (e, c): each einsum (and its transposes) then has one
  # contracting dim; contracting (e, c) at once makes XLA transpose operands.
  token_indices = jnp.where(slots.valid, slots.token_indices, -1).reshape(g, e * c)
  dispatch_gns = jax.nn.one_hot(token_indices, num_tokens, dtype=x_gsd.dtype)
  x_gecd = jnp.einsum("gns,gsd->gnd", dispatch_gns, x_gsd).reshape(g, e, c, d)
  y_gecd = expert_fn(x_gecd).astype(x_gsd.dtype) * slots.gates[..., None].astype(x_gsd.dtype)
  return jnp.einsum("gns,gnd->gsd", dispatch_gns, y_gecd.reshape(g, e * c, d))


def dispatch_gather(x_gsd: jax.Array, slots: SlotAssignment, expert_fn: ExpertFn) -> jax.Array:
  """Gather the slots' tokens, scatter-add the gated outputs back."""
  g_idx = jnp.arange(x_gsd.shape[0])[:, None, None]
  x_gecd = x_gsd[g_idx, slots.token_indices]
  y_gecd = expert_fn(x_gecd)
  weights_gec = jnp.where(slots.valid, slots.gates, 0.0).astype(x_gsd.dtype)
  y_gecd = y_gecd.astype(x_gsd.dtype) * weights_gec[..., None]
  return jnp.zeros_like(x_gsd).at[g_idx, slots.token_indices].add(y_gecd)


def dispatch_tokens(method: str, x_gsd: jax.Array, slots: SlotAssignment, expert_fn: ExpertFn) -> jax.Array:
  """Runs `expert_fn` on the slots' tokens with the named dispatch method."""
  if method == "einsum":
    return dispatch_einsum(x_gsd, slots, expert_fn)
  if method == "gather":
    return dispatch_gather(x_gsd, slots, expert_fn)
  raise ValueError(f"dispatch must be one of {DISPATCH_METHODS}, got {method!r}")


def experts_per_token(slots: SlotAssignment, num_tokens: int) -> jax.Array:
  """[G, S] how many experts process each token: the per-token compute allocation."""
  g_idx = jnp.arange(slots.token_indices.shape[0])[:, None, None]
  counts = jnp.zeros((slots.token_indices.shape[0], num_tokens), jnp.float32)
  return counts.at[g_idx, slots.token_indices].add(slots.valid.astype(jnp.float32))
