"""Orbax checkpoints of a training run: state, EMA weights and the data iterator, saved together.

Layout: `workdir/checkpoints/<step>/{state, ema, data_iter}`. Saves are async and
atomic (Orbax writes to a temporary folder and renames it when complete), the
last `keep` are kept. `restore_latest_good` walks back from the newest step and
reports any checkpoint that fails to restore instead of failing the run.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from ec_dit.data import pipeline as data_pipeline
from ec_dit.model import abstract_params

log = logging.getLogger(__name__)


def checkpoint_dir(workdir: str) -> str:
  return os.path.abspath(os.path.join(workdir, "checkpoints"))


def make_manager(workdir: str, *, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=("state", "ema", "data_iter"))


def save(manager: ocp.CheckpointManager, step: int, state: dict, ema: Any, data_iter=None, *,
         force: bool = False) -> bool:
  """Saves (asynchronously) state, EMA params and, when given, the data iterator."""
  items = dict(state=ocp.args.StandardSave(state), ema=ocp.args.StandardSave(ema))
  if data_iter is not None:
    items["data_iter"] = data_pipeline.iterator_save_args(data_iter)
  return manager.save(step, args=ocp.args.Composite(**items), force=force)


def restore_latest_good(manager: ocp.CheckpointManager, abstract_state: dict, abstract_ema: Any, data_iter=None,
                        report=print):
  """Restores the newest checkpoint that restores cleanly.

  Returns (step, state, ema, data_iter) or None when there is no usable
  checkpoint. A checkpoint that fails (truncated, corrupted, wrong shapes) is
  reported through `report` and the previous one is tried.
  """
  for step in sorted(manager.all_steps(), reverse=True):
    items = dict(state=ocp.args.StandardRestore(abstract_state), ema=ocp.args.StandardRestore(abstract_ema))
    if data_iter is not None:
      items["data_iter"] = data_pipeline.iterator_restore_args(data_iter)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001 - any failure means "this checkpoint is not usable"
      report(f"checkpoint at step {step} failed to restore ({type(e).__name__}: {str(e)[:200]}); "
             f"trying the previous one")
      continue
    return step, restored["state"], restored["ema"], restored.get("data_iter", data_iter)
  return None


def restore_ema(config, workdir: str, step: int | None = None) -> dict:
  """The EMA parameters of a run's latest (or given) checkpoint, for inference."""
  path = checkpoint_dir(workdir)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoints in {path}: train first (--mode=train)")
  with ocp.CheckpointManager(path, item_names=("state", "ema", "data_iter")) as manager:
    steps = sorted(manager.all_steps(), reverse=True)
    if step is not None:
      if step not in steps:
        raise ValueError(f"step {step} not among the checkpoints in {path}: {sorted(steps)}")
      steps = [step]
    target = abstract_params(config)
    for s in steps:
      try:
        restored = manager.restore(s, args=ocp.args.Composite(ema=ocp.args.StandardRestore(target)))
        return jax.device_get(restored["ema"])
      except Exception as e:  # noqa: BLE001
        log.warning("checkpoint at step %d failed to restore (%s); trying the previous one", s, e)
  raise FileNotFoundError(f"no restorable checkpoint in {path}")
