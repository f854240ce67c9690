"""The training state: abstract first (shapes and shardings), then a jitted, sharded initialisation.

The state is a pure pytree of arrays, {"step", "params", "opt_state"}, plus the
EMA weights, so that Orbax saves and restores it exactly and a resumed run's
losses equal an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from ec_dit import model as model_lib, sharding


def train_state_shardings(config, tx, mesh: Mesh):
  """(graphdef, abstract state, abstract ema, shardings) without allocating any weights.

  The abstract model comes from `nnx.eval_shape`; the optimizer state's shape
  from `jax.eval_shape(tx.init)`, its shardings mirror the parameters'
  (`opt_state_shardings`), scalars (counts, step) are replicated. `shardings`
  is {"state", "ema", "batch"} with "batch" the sharding of a [batch_size, ...]
  leaf's leading axis.
  """
  rules = config.mesh.rules
  graphdef, param_state = nnx.split(model_lib.abstract_model(config, seed=config.seed), nnx.Param)
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
  return graphdef, state_abs, params_abs, shardings


def init_model(config):
  """(graphdef of the model in training mode, initial params as a pure dict)."""
  model = model_lib.TextToImage(config, rngs=nnx.Rngs(config.seed))
  graphdef, params = nnx.split(model, nnx.Param)
  return graphdef, nnx.to_pure_dict(params)


def init_state(config, tx, mesh=None):
  """(graphdef, state, ema), sharded over `mesh` (default: the config's mesh over all devices).

  Abstract first: shapes and shardings come from `nnx.eval_shape`, then one
  jitted initialisation writes each device's shards directly (out_shardings),
  so no host ever holds a full copy of the weights.
  """
  mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
  graphdef, _, _, shardings = train_state_shardings(config, tx, mesh)

  def init():
    _, params = init_model(config)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

  state = jax.jit(init, out_shardings=shardings["state"])()
  ema = jax.tree.map(jnp.copy, state["params"])  # its own buffers (both are donated to the step)
  return graphdef, state, ema


def ema_decay(config, step):
  """EMA decay with warm-up: short runs are not dominated by the initial weights."""
  return jnp.minimum(config.ema_decay, (1.0 + step) / (10.0 + step))
