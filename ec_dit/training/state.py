"""The training state: abstract first (shapes and shardings, built once per run), then a jitted, sharded init.

The state is a pure pytree of arrays, {"step", "params", "opt_state"}, plus the
EMA weights, so that Orbax saves and restores it exactly and a resumed run's
losses equal an uninterrupted run's bit for bit. The model comes from the
config's task (`ec_dit.tasks.task_for`), so every family shares this module.

    abstract = abstract_state(config, tx, mesh)        # once per run
    state, ema = init_state(config, tx, abstract)
    train_step = step.make_train_step(config, abstract, tx)
    restored = checkpoint.restore_latest_good(manager, abstract.state, abstract.ema, ...)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from ec_dit import sharding, tasks


class AbstractState(NamedTuple):
  """A run's state without arrays: what init, the step, checkpoints and held-out loss all take.

  graphdef: the model's graph in training mode; state, ema: ShapeDtypeStructs (with shardings) of
  {"step", "params", "opt_state"} and of the EMA params; shardings: {"state", "ema", "batch"} with
  "batch" the sharding of a [batch_size, ...] leaf's leading axis; mesh: the mesh they live on.
  """
  graphdef: Any
  state: dict
  ema: dict
  shardings: dict
  mesh: Mesh


def abstract_state(config, tx, mesh: Mesh | None = None) -> AbstractState:
  """The run's `AbstractState` on `mesh` (default: the config's mesh over all devices), allocating no weights.

  The abstract model comes from the task (`nnx.eval_shape`); the optimizer
  state's shape from `jax.eval_shape(tx.init)`, its shardings mirror the
  parameters' (`opt_state_shardings`), scalars (counts, step) are replicated.
  """
  mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
  rules = config.mesh.rules
  graphdef, param_state = nnx.split(tasks.task_for(config).abstract_model(config, seed=config.seed), nnx.Param)
  params_sh = sharding.param_shardings(param_state, mesh, rules)
  params_abs = sharding.abstract(nnx.to_pure_dict(param_state), params_sh)
  opt_abs = jax.eval_shape(tx.init, params_abs)
  rep = sharding.replicated(mesh)
  opt_sh = sharding.opt_state_shardings(opt_abs, params_abs, params_sh, rep)
  state_sh = {"step": rep, "params": params_sh, "opt_state": opt_sh}
  state_abs = {"step": jax.ShapeDtypeStruct((), np.int32, sharding=rep), "params": params_abs,
               "opt_state": sharding.abstract(opt_abs, opt_sh)}
  shardings = {"state": state_sh, "ema": params_sh,
               "batch": sharding.batch_sharding(mesh, rules, config.batch_size)}
  return AbstractState(graphdef, state_abs, params_abs, shardings, mesh)


def init_model(config):
  """(graphdef of the task's model in training mode, initial params as a pure dict)."""
  graphdef, params = nnx.split(tasks.task_for(config).build_model(config), nnx.Param)
  return graphdef, nnx.to_pure_dict(params)


def init_state(config, tx, abstract: AbstractState):
  """(state, ema) of a fresh run, sharded as `abstract` says.

  One jitted initialisation writes each device's shards directly
  (out_shardings), so no host ever holds a full copy of the weights.
  """
  def init():
    _, params = init_model(config)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

  state = jax.jit(init, out_shardings=abstract.shardings["state"])()
  ema = jax.tree.map(jnp.copy, state["params"])  # its own buffers (both are donated to the step)
  return state, ema


def ema_decay(config, step):
  """EMA decay with warm-up: short runs are not dominated by the initial weights."""
  return jnp.minimum(config.ema_decay, (1.0 + step) / (10.0 + step))
