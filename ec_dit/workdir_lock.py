"""One job per folder: the exclusive lock a training run (`ec_dit.training.workdir`) and `prepare` take.

`Lock(folder)` creates `folder/run.lock` (host, pid, start time) with O_CREAT |
O_EXCL. A second job fails at once naming the holder; a lock whose process is
gone (same host, pid not alive) is taken over with a message. Atomic on local
disks and POSIX shared filesystems (NFS v3+); not on object stores mounted as
files (gcsfuse and the like), where two jobs can both get it. It lives below
both `training` and `prepare` so that neither imports the other.
"""

from __future__ import annotations

import json
import os
import socket
import time

from ec_dit import errors

LOCK_NAME = "run.lock"
_HELD: set[str] = set()  # lock paths this process holds


class WorkdirError(errors.EcDitError, RuntimeError):
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
