"""Upcycling run directories: a dense run's latest checkpoint in, an upcycled run out (`python -m ec_dit.upcycle`).

The new run holds `config.json` (with `config.upcycled` saying what was done)
and one checkpoint: at step 0 with a fresh optimizer ("reset"), or at the
source's step with its optimizer state upcycled ("carry"). Parameters and EMA
are both upcycled; the router of the EMA equals the parameters'. Training then
continues in it as in any run (the data iterator starts from the beginning).
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from ec_dit import checkpoint, tasks, upcycle
from ec_dit.convert import dit_moe as dit_moe_convert
from ec_dit.inference import load_run_config
from ec_dit.training import optimizers


def restore_state(config, workdir: str):
  """(step, params, opt_state, ema) of a run's latest checkpoint, as numpy trees."""
  path = checkpoint.checkpoint_dir(workdir)
  steps = checkpoint.saved_steps(workdir) if os.path.isdir(path) else []
  if not steps:
    raise FileNotFoundError(f"no checkpoints in {path}")
  params = tasks.task_for(config).abstract_params(config)
  tx = optimizers.make_optimizer(config)
  target = {"step": jax.ShapeDtypeStruct((), np.int32), "params": params, "opt_state": jax.eval_shape(tx.init, params)}
  with ocp.CheckpointManager(path, item_names=("state", "ema", "data_iter")) as manager:
    restored = manager.restore(max(steps), args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                    ema=ocp.args.StandardRestore(params)))
  state, ema = jax.device_get(restored["state"]), jax.device_get(restored["ema"])
  return int(state["step"]), state["params"], state["opt_state"], ema


def write_upcycled(config, params: dict, out: str, *, seed: int = 0, ema: dict | None = None, opt_state=None,
                   step: int = 0, source: str = "", **options) -> str:
  """Upcycles a dense model (`config`, `params`) by `options` (see `upcycle.upcycled_config`) into run `out`."""
  new_config = upcycle.upcycled_config(config, source=source, source_step=step, **options)
  new_params = upcycle.upcycle_params(params, config, new_config, seed=seed)
  # the same seed draws the same routers: the EMA of a freshly initialised weight is the weight
  new_ema = None if ema is None else upcycle.upcycle_params(ema, config, new_config, seed=seed)
  carry = new_config.upcycled.optimizer_state == "carry" and opt_state is not None
  new_opt = upcycle.upcycle_opt_state(opt_state, params, config, new_config) if carry else None
  return dit_moe_convert.write_run(new_config, new_params, out, ema=new_ema, opt_state=new_opt,
                                   step=step if carry else 0)


def upcycle_run(run: str, out: str, *, seed: int = 0, **options) -> str:
  """Upcycles run `run`'s latest checkpoint (parameters, EMA, optionally the optimizer state) into run `out`."""
  config = load_run_config(run)
  step, params, opt_state, ema = restore_state(config, run)
  return write_upcycled(config, params, out, seed=seed, ema=ema, opt_state=opt_state, step=step,
                        source=os.path.abspath(run), **options)
