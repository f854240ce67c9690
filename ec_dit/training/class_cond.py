"""Class-conditional training (DiT-MoE): the sharded state and the jitted step, for `config.model.arch == "dit_moe"`.

The counterparts of `ec_dit.training.state` and `ec_dit.training.step` for the
class-conditional network (`ec_dit.model.dit_moe`) and its losses
(`ec_dit.class_diffusion`), with the same conventions: the state is the pure
pytree {"step", "params", "opt_state"} plus the EMA weights; shardings come from
the parameters' logical axes and `config.mesh.rules`; the batch is split over
the `batch` rule's mesh axes; state and EMA are donated. A batch is
{"image": [B, H, W, C] float32 latents, "label": [B] int32}, or, from prepared latents
(`config.input.source = "latents:DIR"`), {"latent_mean", "latent_std", "label"}: the step
then draws the latents as the text-to-image step does (`step.draw_latents`).

    tx = optimizers.make_optimizer(config)
    graphdef, state, ema = init_state(config, tx, mesh)
    train_step = make_train_step(config, graphdef, tx, mesh)
    state, ema, metrics = train_step(state, ema, batch)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from ec_dit import class_diffusion, sharding
from ec_dit.model import dit_moe
from ec_dit.training import state as state_lib, step as step_lib


def train_state_shardings(config, tx, mesh: Mesh):
  """(graphdef, abstract state, abstract ema, shardings) of the DiT-MoE network, without allocating weights:
  `ec_dit.training.state.train_state_shardings`, whose abstract model follows `config.model.arch`."""
  return state_lib.train_state_shardings(config, tx, mesh)


def init_state(config, tx, mesh: Mesh | None = None):
  """(graphdef, state, ema) of a fresh DiT-MoE run, each device writing only its shards."""
  mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
  graphdef, _, _, shardings = train_state_shardings(config, tx, mesh)

  def init():
    params = nnx.to_pure_dict(nnx.state(dit_moe.build(config), nnx.Param))
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

  state = jax.jit(init, out_shardings=shardings["state"])()
  ema = jax.tree.map(jnp.copy, state["params"])
  return graphdef, state, ema


def loss_fn(config, graphdef, params, batch, key):
  """The class-conditional loss of `config.class_diffusion.objective` at `params`; returns (loss, aux)."""
  model = nnx.merge(graphdef, params)
  return class_diffusion.loss(model, batch, key, config)


def make_train_step(config, graphdef, tx, mesh: Mesh | None = None):
  """The jitted class-conditional update (loss, gradients, optimizer, EMA), sharded as `step.make_train_step`.

  Metrics: loss, mse, vb (DDPM's variational bound term), aux_loss, grad_norm,
  params_finite and the per-layer router diagnostics.
  """
  mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
  _, _, _, shardings = train_state_shardings(config, tx, mesh)

  def train_step(state, ema, batch):
    with sharding.activation_sharding(mesh, config.mesh.rules):
      key = jax.random.fold_in(jax.random.key(config.seed), state["step"])
      inputs = {"image": step_lib.draw_latents(batch, key), "label": batch["label"]}
      (loss, aux), grads = jax.value_and_grad(
          lambda p: loss_fn(config, graphdef, p, inputs, key), has_aux=True)(state["params"])
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      params = optax.apply_updates(state["params"], updates)
      decay = state_lib.ema_decay(config, state["step"])
      ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
      finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
      metrics = {"loss": loss, "mse": aux["mse"], "vb": aux["vb"], "aux_loss": aux["aux_loss"],
                 "params_finite": finite, "grad_norm": optax.global_norm(grads),
                 **step_lib.summarize_diagnostics(aux["moe"])}
      return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, ema, metrics

  return jax.jit(train_step, donate_argnums=(0, 1),
                 in_shardings=(shardings["state"], shardings["ema"], shardings["batch"]),
                 out_shardings=(shardings["state"], shardings["ema"], sharding.replicated(mesh)))
