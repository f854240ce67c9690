"""A training run's workdir: one run at a time, checks before writes, nothing saved overwritten.

* `Lock` (`ec_dit.workdir_lock`, shared with `prepare`): an exclusive lock file
  `workdir/run.lock` (host, pid, start time), created with O_CREAT | O_EXCL by
  process 0. A second run fails at once naming the holder; a stale lock is
  taken over with a message.
* `check_config`: the new config against the `config.json` the checkpoints were
  written with (`ec_dit.schema.resume`): fields that change the saved state stop
  the run with one message; safe ones are named in one line.
* `write_config`: `config.json` atomically (temporary file, then rename), and
  only after every check passed.
* `set_aside_old_logs`: a fresh start over an old `metrics.jsonl` (checkpoints
  deleted) moves the old logs aside instead of appending to them.
* `remove_partial_checkpoints`: deletes the temporary folders of saves that
  never completed (a killed process, a full disk).
"""

from __future__ import annotations

import json
import os
import shutil
import time

from ec_dit import checkpoint, schema
from ec_dit.workdir_lock import LOCK_NAME, Lock, WorkdirError  # noqa: F401 - re-exported (one lock for all jobs)

CONFIG_NAME = "config.json"


def config_record(config) -> dict:
  """The config as `config.json` stores it (tuples as lists)."""
  return json.loads(json.dumps(config.to_dict(), default=list))


def check_config(workdir: str, config, report=print) -> None:
  """Compares `config` with the `config.json` the workdir's checkpoints were saved with.

  Does nothing without checkpoints or without a stored config. Raises
  WorkdirError listing every state-changing difference (old -> new); reports the
  safe ones in one line. When the latest checkpoint holds no data iterator (an
  imported checkpoint), the data stream (seed, batch size, input) may change.
  """
  path = os.path.join(workdir, CONFIG_NAME)
  steps = checkpoint.saved_steps(workdir)
  if not steps or not os.path.isfile(path):
    return
  try:
    with open(path) as f:
      old = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise WorkdirError(f"{path} is not valid JSON ({e}), so the new config cannot be checked against the run's "
                       f"checkpoints (steps {steps}); restore it, or use a new --workdir") from None
  imported = not checkpoint.has_data_iter(checkpoint.checkpoint_dir(workdir), steps[-1])  # e.g. ec_dit.convert's
  state, safe = schema.split_differences(schema.config_differences(old, config_record(config)),
                                         data_stream_saved=not imported)
  if state:
    lines = "\n".join(f"  config.{f}: {a!r} -> {b!r}" for f, a, b in state)
    raise WorkdirError(
        f"{workdir} holds checkpoints (steps {steps}) of a run whose config differs in fields that change the saved "
        f"state (its shapes, structure or data stream):\n{lines}\nNothing was changed. To continue that run, "
        f"drop these overrides (its config is {path}); to start a new run with them, use a new --workdir "
        f"(or move this one aside).")
  if safe:
    report("resuming with changed settings: " + ", ".join(f"{f} {a!r} -> {b!r}" for f, a, b in safe))


def write_config(workdir: str, config) -> None:
  """Writes `config.json` atomically: a temporary file, fsynced, then renamed over the old one."""
  path = os.path.join(workdir, CONFIG_NAME)
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      json.dump(config.to_dict(), f, indent=2, default=list)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def set_aside_old_logs(workdir: str, report=print) -> str | None:
  """On a fresh start (no checkpoint), moves an old metrics.jsonl, tensorboard/ and config.json aside.

  They go to `workdir/previous/<time>/`, so the new run's metrics are not mixed
  with the old run's. Returns that folder, or None when there was nothing to move.
  """
  names = [n for n in ("metrics.jsonl", "tensorboard", CONFIG_NAME) if os.path.exists(os.path.join(workdir, n))]
  if "metrics.jsonl" not in names and "tensorboard" not in names:
    return None
  dest = os.path.join(workdir, "previous", time.strftime("%Y%m%d-%H%M%S"))
  while os.path.exists(dest):
    dest += "_"
  os.makedirs(dest)
  for n in names:
    os.replace(os.path.join(workdir, n), os.path.join(dest, n))
  report(f"no checkpoint in {checkpoint.checkpoint_dir(workdir)}: starting from scratch; the old "
         f"{', '.join(names)} moved to {dest}")
  return dest


def remove_partial_checkpoints(workdir: str, report=print) -> list[str]:
  """Deletes `checkpoints/*.orbax-checkpoint-tmp*` (saves that never completed); returns what it removed."""
  d = checkpoint.checkpoint_dir(workdir)
  if not os.path.isdir(d):
    return []
  removed = sorted(n for n in os.listdir(d) if ".orbax-checkpoint-tmp" in n)
  for n in removed:
    shutil.rmtree(os.path.join(d, n), ignore_errors=True)
  if removed:
    report(f"removed {len(removed)} incomplete checkpoint folder(s) left by an interrupted save: "
           f"{', '.join(removed)}")
  return removed
