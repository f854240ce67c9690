"""Where a run's numbers go: metrics.jsonl, TensorBoard event files (no TensorFlow), a progress bar.

Only the main process writes; the others get a writer that does nothing.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np


class MetricsWriter:
  """Writes one JSON object per logged step to `workdir/metrics.jsonl` and the same
  scalars to TensorBoard (tensorboardX) under `workdir/tensorboard`."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if enabled:
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write_scalars(self, step: int, scalars: dict[str, float]):
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")
    self._jsonl.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)

  def write_image(self, step: int, tag: str, image: np.ndarray):
    if self.enabled:
      self._tb.add_image(tag, np.asarray(image), step, dataformats="HWC")

  def message(self, text: str):
    if self.enabled:
      print(text, file=sys.stderr, flush=True)

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def progress_bar(total: int, initial: int, *, enabled: bool = True):
  """A tqdm bar with steps/s and ETA."""
  from tqdm import tqdm
  return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled, dynamic_ncols=True,
              smoothing=0.1)
