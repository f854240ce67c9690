"""Routing as pure math: who computes what, with which gate.

Everything here is a pure function of float32 router probabilities, so it can be
tested against golden values and reused outside the layers.

EC-DiT (Sun et al. 2024, arXiv 2410.02098) routes by expert choice (Zhou et al.
2022, "Mixture-of-Experts with Expert Choice Routing"). Its symbols, for one
routing group of S tokens X [S, D], E experts of capacity C = S * c / E:

  S = softmax(X W_g)        router probabilities [S, E], float32:
                            `ec_dit.moe.layers.Router` (X W_g) and
                            `router_probabilities` (the softmax)
  (G, I) = TopK(S^T, C)     each expert's C highest-scoring tokens and their
                            gates [E, C]: `expert_choice` (`capacity` gives C)
  P = one-hot(I)            the dispatch [E, C, S]: `ec_dit.moe.dispatch`
                            (`dispatch_einsum` builds P; `dispatch_gather`
                            indexes with I instead)
  Y = sum_e,c G[e,c] P[e,c]^T FFN_e(P[e] X)
                            the combine: each token's output is the gated sum
                            of the experts that took it (same functions)

Token choice (DiT-MoE) is `token_choice` + `token_choice_slots` and
`balance_loss`.

Dimension letters used in names and einsums throughout `ec_dit.moe`:
  g  routing group        s  token within a group     e  expert
  c  capacity slot        k  choice of a token        d  model width
  h  expert hidden width
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class SlotAssignment(NamedTuple):
  """What every expert computes: C slots per expert and group.

  Attributes:
    gates: [G, E, C] float32 weight of each slot's output (0 for an empty slot).
    token_indices: [G, E, C] int32 token (within its group) held by each slot.
    valid: [G, E, C] bool, False for an empty slot (token choice with fewer
      tokens than capacity). Expert choice fills every slot.
  """
  gates: jax.Array
  token_indices: jax.Array
  valid: jax.Array


def capacity(group_tokens: int, capacity_factor: float, num_experts: int) -> int:
  """Expert-choice capacity C = round(S * capacity_factor / E), at least 1, at most S.

  Rounding is half-up (2.5 -> 3), so C does not depend on Python's banker's rounding.
  With capacity factor c every token is processed by c experts on average.
  """
  if capacity_factor <= 0:
    raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
  c = int(math.floor(group_tokens * capacity_factor / num_experts + 0.5))
  return max(1, min(c, group_tokens))


def router_probabilities(logits: jax.Array) -> jax.Array:
  """Softmax over the expert axis, always in float32."""
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def router_z_loss(logits: jax.Array) -> jax.Array:
  """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2 (float32).

  Keeps router logits small so the float32 softmax stays well conditioned.
  """
  z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  return jnp.mean(jnp.square(z))


def expert_choice(router_probs: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
  """Expert-choice routing (Zhou et al. 2022; EC-DiT): (G, I) = TopK(S^T, C), each expert's top-C tokens.

  Args:
    router_probs: [G, S, E] float32 router probabilities.
    capacity: C, tokens each expert takes in each group (1 <= C <= S).

  Returns:
    gates: [G, E, C] the probabilities of the chosen tokens for that expert,
      highest first.
    token_indices: [G, E, C] int32 indices of the chosen tokens within the group.
    Ties are broken towards the lower token index (`lax.top_k`'s rule).
  """
  num_tokens = router_probs.shape[1]
  if not 1 <= capacity <= num_tokens:
    raise ValueError(f"capacity must be in [1, {num_tokens}] (tokens per group), got {capacity}")
  probs_ges = jnp.swapaxes(router_probs.astype(jnp.float32), 1, 2)
  gates, token_indices = jax.lax.top_k(probs_ges, capacity)
  return gates, token_indices.astype(jnp.int32)


def token_choice(router_probs: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Token-choice top-k routing (DiT-MoE): each token picks its k most probable experts.

  Args:
    router_probs: [G, S, E] float32.
    k: experts per token (1 <= k <= E).

  Returns:
    gates: [G, S, k] float32 probabilities of the chosen experts, highest first.
    expert_indices: [G, S, k] int32.
  """
  num_experts = router_probs.shape[-1]
  if not 1 <= k <= num_experts:
    raise ValueError(f"k must be in [1, {num_experts}] (num_experts), got {k}")
  gates, expert_indices = jax.lax.top_k(router_probs.astype(jnp.float32), k)
  return gates, expert_indices.astype(jnp.int32)


def balance_loss(router_probs: jax.Array, expert_indices: jax.Array, num_experts: int) -> jax.Array:
  """DiT-MoE's expert-level balance loss, without its coefficient.

  loss = sum_i P_i * f_i, with P_i the mean router probability of expert i over
  all tokens and f_i = E * (tokens routed to i) / (tokens * k). Equals 1 when
  routing is perfectly uniform.

  Args:
    router_probs: [..., E] float32.
    expert_indices: [..., k] int32 experts chosen by each token.
    num_experts: E.
  """
  probs = router_probs.reshape(-1, num_experts).astype(jnp.float32)
  chosen = expert_indices.reshape(probs.shape[0], -1)
  num_tokens, k = chosen.shape
  counts = jnp.zeros((num_experts,), jnp.float32).at[chosen.reshape(-1)].add(1.0)
  f = num_experts * counts / (num_tokens * k)
  p = jnp.mean(probs, axis=0)
  return jnp.sum(p * f)


def expert_choice_slots(router_probs: jax.Array, capacity: int) -> SlotAssignment:
  """Expert choice as a slot assignment (every slot is filled)."""
  gates, token_indices = expert_choice(router_probs, capacity)
  return SlotAssignment(gates, token_indices, jnp.ones(gates.shape, bool))


def token_choice_slots(gates_gsk: jax.Array, experts_gsk: jax.Array, num_experts: int,
                       capacity: int) -> SlotAssignment:
  """Token choice with a capacity: place each (token, choice) in its expert's next free slot.

  Priority follows the choice rank first (every token's first choice before any
  second choice), then token order, as in Switch/GShard-style dispatch. A choice
  that finds its expert full is dropped.

  Returns a SlotAssignment with shapes [G, E, C]; `valid` marks filled slots.
  """
  g, s, k = experts_gsk.shape
  # Order (choice rank, token): [G, k*S].
  experts_gn = jnp.swapaxes(experts_gsk, 1, 2).reshape(g, k * s)
  gates_gn = jnp.swapaxes(gates_gsk, 1, 2).reshape(g, k * s)
  tokens_n = jnp.tile(jnp.arange(s, dtype=jnp.int32), k)
  onehot_gne = jax.nn.one_hot(experts_gn, num_experts, dtype=jnp.int32)
  # Position of each choice inside its expert's queue (0-based).
  position_gn = jnp.sum((jnp.cumsum(onehot_gne, axis=1) - 1) * onehot_gne, axis=-1)
  kept_gn = position_gn < capacity
  # Scatter kept choices into [G, E, C]; dropped ones go to a dummy slot C.
  slot_gn = jnp.where(kept_gn, position_gn, capacity)
  g_idx = jnp.arange(g)[:, None]
  token_indices = jnp.zeros((g, num_experts, capacity + 1), jnp.int32)
  token_indices = token_indices.at[g_idx, experts_gn, slot_gn].set(jnp.broadcast_to(tokens_n, (g, k * s)))
  gates = jnp.zeros((g, num_experts, capacity + 1), jnp.float32)
  gates = gates.at[g_idx, experts_gn, slot_gn].set(gates_gn)
  valid = jnp.zeros((g, num_experts, capacity + 1), bool).at[g_idx, experts_gn, slot_gn].set(True)
  return SlotAssignment(gates[..., :capacity], token_indices[..., :capacity], valid[..., :capacity])
