"""Orbax checkpoints of a training run: state, EMA weights and the data iterator, saved together.

Layout: `workdir/checkpoints/<step>/{state, ema, data_iter}`. Saves are async and
atomic (Orbax writes to a temporary folder and renames it when complete), the
last `keep` are kept. `restore_latest_good` walks back from the newest step and
reports any checkpoint that fails to restore; when checkpoints exist and none
restores it raises `RestoreError` (a run never starts from scratch over them).
A save that fails (e.g. a full disk) surfaces as one `SaveError` naming the step,
the path, the cause and the last good checkpoint (`save_error`). Orbax's own
error logs (tracebacks, thousands of lines) are filtered out: these errors say it.

The module receives what it saves and restores: the abstract state and EMA
(`ec_dit.training.state.abstract_state`, or a task's `abstract_params`), and the
data iterator with the function that makes its Orbax args
(`ec_dit.data.pipeline.iterator_save_args` / `iterator_restore_args`); it builds
neither the model nor the data.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from etils import epath

from ec_dit import errors

log = logging.getLogger(__name__)


class RestoreError(errors.CheckpointError, RuntimeError):
  """Checkpoints exist but none restores: the message lists each one's reason."""


class SaveError(errors.EcDitError, RuntimeError):
  """A checkpoint save failed: the message names the step, path, cause and the last good checkpoint."""


def checkpoint_dir(workdir: str) -> str:
  """`workdir/checkpoints`, absolute."""
  return os.path.abspath(os.path.join(workdir, "checkpoints"))


def saved_steps(workdir: str) -> list[int]:
  """The steps of the complete checkpoints in `workdir` (Orbax renames a save's folder to its step when done)."""
  d = checkpoint_dir(workdir)
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit() and os.path.isdir(os.path.join(d, n)))


class _OrbaxErrorFilter(logging.Filter):
  """Drops Orbax's (and its asyncio's) error logs: every failure they describe is raised by this module instead."""

  def filter(self, record: logging.LogRecord) -> bool:
    path = record.pathname.replace(os.sep, "/")
    return not ("/orbax/" in path or (record.name == "asyncio" and "Event loop is closed" in record.getMessage()))


_FILTER = _OrbaxErrorFilter()


def quiet_orbax_logs() -> None:
  """Installs the filter on the `absl` and `asyncio` loggers (idempotent)."""
  for name in ("absl", "asyncio"):
    if _FILTER not in logging.getLogger(name).filters:
      logging.getLogger(name).addFilter(_FILTER)


def make_manager(workdir: str, *, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
  """The run's CheckpointManager (async saves, the last `keep` kept)."""
  quiet_orbax_logs()
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=("state", "ema", "data_iter"))


def _iterator_args(data_iter, iterator_args):
  if iterator_args is None:
    raise TypeError("checkpoint: a data iterator needs iterator_args, the function giving its Orbax args")
  return iterator_args(data_iter)


def save(manager: ocp.CheckpointManager, step: int, state: dict, ema: Any, data_iter=None, *,
         iterator_args: Callable | None = None, force: bool = False) -> bool:
  """Saves (asynchronously) state, EMA params and, when given, the data iterator
  (`iterator_args(data_iter)` gives its Orbax save args, e.g. `ec_dit.data.pipeline.iterator_save_args`)."""
  items = dict(state=ocp.args.StandardSave(state), ema=ocp.args.StandardSave(ema))
  if data_iter is not None:
    items["data_iter"] = _iterator_args(data_iter, iterator_args)
  return manager.save(step, args=ocp.args.Composite(**items), force=force)


def has_data_iter(directory: str, step: int) -> bool:
  """True when the checkpoint of `step` in `directory` (a run's `checkpoints/`) holds a data iterator."""
  return os.path.isdir(os.path.join(directory, str(step), "data_iter"))


def _short(e: BaseException, limit: int = 300) -> str:
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def restore_latest_good(manager: ocp.CheckpointManager, abstract_state: dict, abstract_ema: Any, data_iter=None,
                        *, iterator_args: Callable | None = None, report=print):
  """Restores the newest checkpoint that restores cleanly.

  Returns (step, state, ema, data_iter), or None when there is no checkpoint. A
  checkpoint without a data iterator item (an imported one: `ec_dit.convert`
  writes state and EMA only) restores its state and EMA, and `data_iter` is
  returned as given (fresh), with a message through `report`. A
  checkpoint that fails (truncated, corrupted, wrong shapes) is reported through
  `report` and the previous one is tried; when all fail, raises `RestoreError`
  with each one's reason (the checkpoints are left as they are). `iterator_args(data_iter)`
  gives the iterator's Orbax restore args (e.g. `ec_dit.data.pipeline.iterator_restore_args`).
  """
  reasons = []
  for step in sorted(manager.all_steps(), reverse=True):
    mismatch = shape_mismatch(os.path.join(str(manager.directory), str(step)),
                              dict(ema=abstract_ema, state=abstract_state))
    if mismatch:  # checked from the metadata: a restore would fail after minutes of noisy logs
      reasons.append(f"step {step}: {mismatch}")
      report(f"checkpoint at step {step} does not fit this config ({mismatch}); trying the previous one")
      continue
    items = dict(state=ocp.args.StandardRestore(abstract_state), ema=ocp.args.StandardRestore(abstract_ema))
    if data_iter is not None and has_data_iter(str(manager.directory), step):
      items["data_iter"] = _iterator_args(data_iter, iterator_args)
    elif data_iter is not None:
      report(f"checkpoint at step {step} holds no data iterator (an imported checkpoint, e.g. from "
             f"python -m ec_dit.convert): restoring its state and EMA, the data starts from its beginning")
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001 - any failure means "this checkpoint is not usable"
      reasons.append(f"step {step}: {_short(e)}")
      report(f"checkpoint at step {step} failed to restore ({_short(e, 200)}); trying the previous one")
      continue
    return step, restored["state"], restored["ema"], restored.get("data_iter", data_iter)
  if reasons:
    raise RestoreError(
        f"none of the {len(reasons)} checkpoints in {manager.directory} restores, so the run stops instead of "
        f"starting again from scratch over them (nothing was changed):\n  " + "\n  ".join(reasons) +
        "\nIf the config changed since they were saved, rerun with the run's config (its config.json); "
        "to start a new run, use a new --workdir.")
  return None


def _shapes(tree) -> dict[str, tuple]:
  """{"a/b/0/c": shape} of a pytree's array leaves (path tokens only, so metadata and abstract trees agree)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if hasattr(leaf, "shape"):
      out["/".join(re.findall(r"[\w-]+", jax.tree_util.keystr(path)))] = tuple(leaf.shape)
  return out


def shape_mismatch(step_dir: str, abstract: dict) -> str | None:
  """How the arrays saved in `step_dir/<item>` differ from `abstract` items' shapes; None if they agree or
  the metadata cannot be read (then the restore itself decides)."""
  problems = []
  for item, tree in abstract.items():
    try:
      saved = _shapes(ocp.StandardCheckpointHandler().metadata(epath.Path(step_dir) / item).tree)
    except Exception:  # noqa: BLE001 - no or unreadable metadata: let the restore try
      return None
    wanted = _shapes(tree)
    for path in sorted(set(saved) | set(wanted)):
      if saved.get(path) != wanted.get(path):
        problems.append(f"{item}/{path}: saved {saved.get(path, 'absent')}, this config {wanted.get(path, 'absent')}")
  if not problems:
    return None
  return "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")


def _no_space(e: BaseException) -> bool:
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno == errno.ENOSPC or re.search(r"no space left", str(e), re.I):
      return True
    e = e.__cause__ or e.__context__
  return False


def save_error(workdir: str, step: int, error: BaseException) -> SaveError:
  """The one-message error for a failed save of `step` (the last good checkpoint named, or its absence)."""
  good = [s for s in saved_steps(workdir) if s != step]
  cause = "no space left on device" if _no_space(error) else _short(error)
  last = (f"the last good checkpoint is step {good[-1]} in {checkpoint_dir(workdir)}" if good
          else "there is no complete checkpoint yet")
  return SaveError(f"saving the checkpoint of step {step} to {checkpoint_dir(workdir)} failed: {cause}. The run "
                   f"stops; {last}. Fix the cause (free disk space), then rerun the same command: it resumes from "
                   f"the last good checkpoint and removes the partial folder.")


def restore_ema(workdir: str, abstract_ema: dict, step: int | None = None) -> dict:
  """The EMA parameters of a run's latest (or given) checkpoint, for inference; `abstract_ema` is the
  target's ShapeDtypeStructs (a task's `abstract_params(config)`)."""
  path = checkpoint_dir(workdir)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoints in {path}: train first (--mode=train), or import a DiT-MoE "
                            f"checkpoint (python -m ec_dit.convert)")
  with ocp.CheckpointManager(path, item_names=("state", "ema", "data_iter")) as manager:
    steps = sorted(manager.all_steps(), reverse=True)
    if step is not None:
      if step not in steps:
        raise ValueError(f"step {step} not among the checkpoints in {path}: {sorted(steps)}")
      steps = [step]
    for s in steps:
      try:
        restored = manager.restore(s, args=ocp.args.Composite(ema=ocp.args.StandardRestore(abstract_ema)))
        return jax.device_get(restored["ema"])
      except Exception as e:  # noqa: BLE001
        log.warning("checkpoint at step %d failed to restore (%s); trying the previous one", s, e)
  raise FileNotFoundError(f"no restorable checkpoint in {path}")
