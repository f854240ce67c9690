"""The one jitted train step of every task: the task's loss, gradients, optimizer update and EMA, with router
diagnostics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ec_dit import sharding, tasks
from ec_dit.training import state as state_lib


def summarize_diagnostics(moe: dict) -> dict[str, jax.Array]:
  """Per-layer scalar router diagnostics for logging."""
  out = {}
  for layer, d in moe.items():
    counts = d["experts_per_token"]
    out[f"moe/{layer}/experts_per_token_mean"] = jnp.mean(counts)
    out[f"moe/{layer}/experts_per_token_std"] = jnp.std(counts)
    out[f"moe/{layer}/experts_per_token_max"] = jnp.max(counts)
    out[f"moe/{layer}/dropped_fraction"] = d["dropped_fraction"]
    out[f"moe/{layer}/mean_top_gate"] = d["mean_top_gate"]
    out[f"moe/{layer}/router_z_loss"] = d["router_z_loss"]
    out[f"moe/{layer}/expert_usage_max"] = jnp.max(d["expert_usage"])
    if "balance_loss" in d:
      out[f"moe/{layer}/balance_loss"] = d["balance_loss"]
  return out


def make_train_step(config, abstract: state_lib.AbstractState, tx):
  """The jitted update of the config's task: loss, gradients, optimizer (config.optimizer), EMA; state and
  EMA buffers are donated.

  Jitted with explicit in/out shardings from `abstract` (the run's
  `state.abstract_state`, built once): state and EMA by the parameters' logical
  axes, the batch over the `batch` rule's axes, metrics replicated. The MoE
  layers' activation constraints are active while the step is traced. Metrics:
  loss, the task's `metric_keys` (mse, aux_loss; vb for class-conditional),
  grad_norm, params_finite and the per-layer router diagnostics.
  """
  task = tasks.task_for(config)
  graphdef, shardings, mesh = abstract.graphdef, abstract.shardings, abstract.mesh

  def train_step(state, ema, batch):
    with sharding.activation_sharding(mesh, config.mesh.rules):
      return _train_step(state, ema, batch)

  def _train_step(state, ema, batch):
    key = jax.random.fold_in(jax.random.key(config.seed), state["step"])
    inputs = task.model_inputs(config, batch, key)

    def loss_fn(params):
      return task.loss(config, nnx.merge(graphdef, params), inputs, key)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    decay = state_lib.ema_decay(config, state["step"])
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
    params_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
    metrics = {"loss": loss, **{k: aux[k] for k in task.metric_keys}, "params_finite": params_finite,
               "grad_norm": optax.global_norm(grads), **summarize_diagnostics(aux["moe"])}
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, ema, metrics

  return jax.jit(train_step, donate_argnums=(0, 1),
                 in_shardings=(shardings["state"], shardings["ema"], shardings["batch"]),
                 out_shardings=(shardings["state"], shardings["ema"], sharding.replicated(mesh)))


def check_batch_split(config, batch_sharding):
  """Raises ValueError naming config.batch_size when the batch would not be split as the mesh asks.

  The batch must divide over the `batch` rule's mesh axes that the config sizes
  explicitly (e.g. `mesh.data=2`): otherwise the sharding would fall back to
  copying the batch to those devices (`sharding.logical_to_spec`), silently
  doing the same work twice. An axis left at -1 ("the rest of the devices")
  splits the batch as far as it divides. With several processes, each feeds its
  own rows, so the batch must also be split across all of them.
  """
  mesh = batch_sharding.mesh
  rules = sharding.rules_dict(config.mesh.rules)
  asked = [a for a in rules.get("batch", ()) if config.mesh[a] != -1 and mesh.shape[a] > 1]
  wanted = int(np.prod([mesh.shape[a] for a in asked]))
  if config.batch_size % wanted:
    sizes = ", ".join(f"mesh.{a}={mesh.shape[a]}" for a in asked)
    raise ValueError(f"config.batch_size: must be a multiple of {wanted} to be split over the batch axes ({sizes}), "
                     f"got {config.batch_size}; otherwise every device of those axes would get the whole batch")
  if jax.process_count() == 1:
    return
  spec = batch_sharding.spec
  axes = () if not len(spec) or spec[0] is None else (spec[0],) if isinstance(spec[0], str) else spec[0]
  split = int(np.prod([mesh.shape[a] for a in axes]))
  if split % jax.process_count():
    raise ValueError(f"config.batch_size={config.batch_size} cannot be split over the mesh's batch axes "
                     f"{dict(mesh.shape)} across {jax.process_count()} processes: make it a "
                     f"multiple of the product of the batch axes")
