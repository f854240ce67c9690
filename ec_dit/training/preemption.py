"""Stopping a training run without losing work: SIGTERM and SIGINT, agreed across processes.

`Preemption` turns the first SIGTERM (how TPU VMs are preempted) or SIGINT
(Ctrl-C) into a request the loop honours after the current step: it saves a
checkpoint of that step and exits 0. While that save runs:

* further SIGTERMs are ignored (one complete save, then exit 0);
* a further SIGINT (or a first SIGINT after a SIGTERM) ends the process at once
  with the default action: the save in flight is abandoned (its temporary folder
  is removed at the next start) and the previous checkpoint stays intact.

The handlers only set a flag, so a signal during XLA compilation takes effect
when compilation returns (no KeyboardInterrupt unwinding through JAX, which used
to end in a segmentation fault).

Multi-host: each process catches its own signals, so the loop asks `agree`
every step whether any process wants to stop; all of them then save the same
step and exit together instead of hanging in the next collective.
"""

from __future__ import annotations

import os
import signal

import jax
import numpy as np
from jax.experimental import multihost_utils


def _say(text: str) -> None:
  """Writes to stderr from a signal handler (os.write: no buffered-I/O reentrancy)."""
  try:
    os.write(2, (text + "\n").encode())
  except OSError:
    pass


class Preemption:
  """Context manager: SIGTERM / SIGINT become `requested`; see the module docstring.

  `requested` is this process's request; the loop combines it across processes
  with `agree`. On exit the previous handlers come back, except that after a
  request SIGTERM stays ignored (the process is about to exit 0 and must not be
  killed while it does).
  """

  def __init__(self):
    self.requested = False
    self.signal_name = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        self._previous = {}
        break
    return self

  def _handle(self, signum, frame):
    name = signal.Signals(signum).name
    if not self.requested:
      self.requested, self.signal_name = True, name
      _say(f"{name}: saving a checkpoint after the current step, then exiting "
           f"(a second SIGINT exits at once, keeping the previous checkpoint)")
      signal.signal(signal.SIGINT, signal.SIG_DFL)  # the next Ctrl-C ends the process at once
    else:
      _say(f"{name} again: still saving the checkpoint; the run exits when it is complete")

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      if sig == signal.SIGTERM and self.requested:
        signal.signal(sig, signal.SIG_IGN)
      elif previous is not None:
        signal.signal(sig, previous)


def agree(stop: bool, *counts: int) -> tuple[bool, list[int]]:
  """(any process wants to stop, each count summed over processes).

  One process: returns its own values. Several: one tiny all-gather, which every
  process must call at the same point of the loop.
  """
  if jax.process_count() == 1:
    return bool(stop), [int(c) for c in counts]
  local = np.asarray([int(bool(stop)), *[int(c) for c in counts]], np.int32)
  gathered = np.asarray(multihost_utils.process_allgather(local)).reshape(jax.process_count(), -1)
  return bool(gathered[:, 0].any()), [int(v) for v in gathered[:, 1:].sum(axis=0)]
