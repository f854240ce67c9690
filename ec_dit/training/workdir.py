"""A training run's workdir: one run at a time, checks before writes, nothing saved overwritten.

* `Lock`: an exclusive lock file `workdir/run.lock` (host, pid, start time),
  created with O_CREAT | O_EXCL by process 0. A second run fails at once naming
  the holder; a lock whose process is gone (same host, pid not alive) is taken
  over with a message. Atomic on local disks and POSIX shared filesystems (NFS
  v3+); not on object stores mounted as files (gcsfuse and the like), where two
  runs can both get it.
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
import socket
import time

from ec_dit import checkpoint, schema

LOCK_NAME = "run.lock"
CONFIG_NAME = "config.json"
_HELD: set[str] = set()  # lock paths this process holds


class WorkdirError(RuntimeError):
  """The run must not start in this workdir; the message says why and what to do."""


def _describe(holder: dict) -> str:
  return f"host {holder.get('host')!r}, pid {holder.get('pid')}, started {holder.get('started')}"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class Lock:
  """The workdir's exclusive lock; `release()` removes it (only if it is still ours)."""

  def __init__(self, workdir: str, report=print):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
    self.info = {"host": socket.gethostname(), "pid": os.getpid(),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    for _ in range(3):
      try:
        self._create()
        _HELD.add(self.path)
        return
      except FileExistsError:
        holder = self._holder()
        if holder is None:
          continue  # removed meanwhile
        if not self._stale(holder):
          raise WorkdirError(
              f"{workdir} is in use by another run ({_describe(holder)}; lock file {self.path}). Wait for it to "
              f"finish or stop it. If that process no longer exists (e.g. its host crashed), delete {self.path}.")
        report(f"taking over the stale lock of a run that is gone ({_describe(holder)})")
        try:
          os.remove(self.path)
        except FileNotFoundError:
          pass
    raise WorkdirError(f"could not take the lock {self.path}: other runs keep taking it")

  def _create(self):
    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(fd, "w") as f:
      json.dump(self.info, f)
      f.flush()
      os.fsync(f.fileno())

  def _holder(self) -> dict | None:
    try:
      with open(self.path) as f:
        text = f.read()
    except FileNotFoundError:
      return None
    try:
      holder = json.loads(text)
      if not isinstance(holder, dict):
        raise ValueError
      return holder
    except ValueError:
      age = time.time() - os.path.getmtime(self.path) if os.path.exists(self.path) else 0
      if age < 10:  # being written by a run starting right now
        return {"host": "?", "pid": "?", "started": "just now"}
      raise WorkdirError(f"the lock file {self.path} is unreadable ({text[:80]!r}): delete it if no run is using "
                         f"{os.path.dirname(self.path)}") from None

  def _stale(self, holder: dict) -> bool:
    if holder.get("host") != self.info["host"] or not isinstance(holder.get("pid"), int):
      return False  # another host: its processes cannot be checked from here
    if holder["pid"] == os.getpid():
      return self.path not in _HELD  # our pid, not held by us: a previous life (e.g. a restarted container)
    return not _alive(holder["pid"])

  def release(self):
    """Removes the lock file if it still holds this process's record."""
    _HELD.discard(self.path)
    try:
      with open(self.path) as f:
        if json.load(f) != self.info:
          return
      os.remove(self.path)
    except (OSError, ValueError):
      pass


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
