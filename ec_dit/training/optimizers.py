"""The optimizer of a run: AdamW, or Muon on the hidden matrices with AdamW on the rest."""

from __future__ import annotations

import optax

from ec_dit.training import muon


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW (or Muon + AdamW) with linear warmup and cosine decay to 10%, after global-norm clipping."""
  warmup = min(config.warmup_steps, max(config.num_train_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
      decay_steps=max(config.num_train_steps, warmup + 1), end_value=0.1 * config.learning_rate)
  update = optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2, weight_decay=config.weight_decay)
  if config.optimizer == "muon":  # AdamW stays for the parameters Muon does not take
    update = muon.muon_adamw(schedule, update, beta=config.muon.beta, ns_steps=config.muon.ns_steps,
                             experts=config.muon.experts, weight_decay=config.weight_decay)
  return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), update)
