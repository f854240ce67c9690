"""Mixture-of-Experts: routing primitives (pure functions), dispatch, and FFN layers.

The router is `Router` (S = softmax(X W_g), float32). Public routing primitives:
  expert_choice(router_probs, capacity) -> (gates, token_indices)   # [G, E, C] each
  token_choice(router_probs, k) -> (gates, expert_indices)          # [G, S, k] each
  balance_loss(router_probs, expert_indices, num_experts)           # DiT-MoE, no coefficient
"""

from ec_dit.moe.routing import (SlotAssignment, balance_loss, capacity, expert_choice,
                                expert_choice_slots, router_probabilities, router_z_loss,
                                token_choice, token_choice_slots)
from ec_dit.moe.dispatch import DISPATCH_METHODS, dispatch_einsum, dispatch_gather, dispatch_tokens
from ec_dit.moe.layers import DenseMLP, ExpertChoiceMoE, Experts, Router, TokenChoiceMoE

__all__ = [
    "SlotAssignment", "balance_loss", "capacity", "expert_choice", "expert_choice_slots",
    "router_probabilities", "router_z_loss", "token_choice", "token_choice_slots",
    "DISPATCH_METHODS", "dispatch_tokens", "dispatch_einsum", "dispatch_gather",
    "DenseMLP", "ExpertChoiceMoE", "Experts", "Router", "TokenChoiceMoE",
]
