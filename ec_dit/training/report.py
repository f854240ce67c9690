"""What a training run tells its user: the model's size at the start, the expected duration once the
first steps are timed, and at the end a "wrote" block naming every output and where it is."""

from __future__ import annotations

import glob
import math
import os
import time

import jax

from ec_dit import checkpoint


def count_params(tree) -> int:
  """Number of scalars in a pytree of arrays or ShapeDtypeStructs."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _human(n: float) -> str:
  for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if n >= scale:
      return f"{n / scale:.3g}{unit}"
  return str(int(n))


def model_size_line(config, params) -> str:
  """One line: parameter count (and its parts: the DiT, a trainable text encoder) and the model's shape."""
  m, f = config.model, config.model.ffn
  parts = {k: count_params(v) for k, v in params.items()} if isinstance(params, dict) else {}
  text = sum(v for k, v in parts.items() if "text" in k)
  split = f" (DiT {_human(count_params(params) - text)} + text encoder {_human(text)})" if text else ""
  ffn = f.kind if f.kind == "dense" else f"{f.kind}, {f.num_experts} experts"
  return (f"model: {_human(count_params(params))} parameters{split}; {m.depth} layers, width {m.hidden_size}, "
          f"{ffn}; {m.input_size}x{m.input_size}x{m.in_channels} input, patch {m.patch_size}")


class DurationEstimate:
  """Prints the expected remaining time once, after `warm` steps (compilation) and `timed` more steps
  (default: 20, or a quarter of a shorter run)."""

  def __init__(self, first_step: int, last_step: int, report, *, warm: int = 2, timed: int | None = None):
    if timed is None:
      timed = min(20, max(1, (last_step - first_step + 1) // 4))
    self.first, self.last, self.report = first_step, last_step, report
    self.warm_at, self.done_at = first_step + warm - 1, first_step + warm + timed - 1
    self.t0 = None

  def step(self, step: int) -> None:
    """Call after each finished step."""
    if step == self.warm_at:
      self.t0 = time.perf_counter()
    elif step == self.done_at and self.t0 is not None and step < self.last:
      rate = (self.done_at - self.warm_at) / max(time.perf_counter() - self.t0, 1e-9)
      left = (self.last - step) / rate
      self.report(f"expected: {left / 60:.1f} min for the remaining {self.last - step} steps at {rate:.2f} steps/s "
                  f"(sample grids and GenEval not included)")


def _listing(paths: list[str]) -> str:
  if not paths:
    return "none"
  if len(paths) <= 2:
    return ", ".join(paths)
  return f"{paths[0]} ... {os.path.basename(paths[-1])} ({len(paths)})"


def wrote_block(workdir: str) -> str:
  """The lines naming a run's outputs: workdir, checkpoint, sample grids, routing maps, GenEval, TensorBoard."""
  steps = checkpoint.saved_steps(workdir)
  ckpt = (f"{os.path.join(checkpoint.checkpoint_dir(workdir), str(steps[-1]))} (step {steps[-1]})" if steps
          else "none")
  grids = sorted(glob.glob(os.path.join(workdir, "samples", "step_*.png")))
  maps = sorted(glob.glob(os.path.join(workdir, "routing_maps", "step_*.png")))
  lines = ["wrote:", f"  workdir       {workdir}", f"  checkpoint    {ckpt}",
           f"  sample grids  {_listing(grids)}", f"  routing maps  {_listing(maps)}"]
  g = os.path.join(workdir, "geneval")
  if os.path.exists(os.path.join(g, "summary.json")):
    lines.append(f"  GenEval       {os.path.join(g, 'results.jsonl')}, summary {os.path.join(g, 'summary.json')}")
  elif os.path.isdir(os.path.join(g, "images")):
    lines.append(f"  GenEval       images {os.path.join(g, 'images')} (score them with the command above)")
  lines.append(f"  TensorBoard   tensorboard --logdir {os.path.join(workdir, 'tensorboard')}")
  return "\n".join(lines)
