"""Where the training loop's time goes outside the jitted step: the tiny default, timed by wrapping what the loop calls.

    python experiments/profile_loop.py --steps 150          # JSON line: ms per step in each part

Runs `ec_dit.evaluators.train` (the CLI's loop: input pipeline, transfers, NaN checks, logging,
checkpoints; sample grids off) for `--steps` steps in a temporary workdir, and records per step, on the host:
  input     waiting in `next(data_iter)` for the input pipeline's next batch
  transfer  `global_batch` (the batch onto the devices)
  dispatch  calling the jitted step (it returns before the step has run)
  other     everything else between two progress-bar updates: waiting for the step's results (NaN check,
            logging), checkpoint saves, the progress bar
and the step interval itself. The first 5 steps (compilation) are left out. Separately, the time of one
sample grid and routing map at the end (`--grid`), the cost a full run pays `num_train_steps / eval_every_steps` times.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from ec_dit import configs, evaluators, host_memory  # noqa: E402
from ec_dit.data import pipeline as data_pipeline  # noqa: E402
from ec_dit.training import metrics as metrics_lib, step as step_lib  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=150)
  parser.add_argument("--grid", action="store_true", help="also time the final sample grid and routing map")
  args = parser.parse_args()
  host_memory.reuse_freed_memory()
  config = configs.load(str(REPO / "configs" / "ec_dit_tiny.py"),
                        overrides=[f"num_train_steps={args.steps}", f"eval_every_steps={args.steps if args.grid else 0}"])
  parts = {"input": [], "transfer": [], "dispatch": []}
  ends: list[float] = []

  def timed(name, fn):
    def wrapper(*a, **k):
      t = time.perf_counter()
      out = fn(*a, **k)
      parts[name].append(time.perf_counter() - t)
      return out
    return wrapper

  real_create, real_make_step, real_bar = data_pipeline.create_dataset, step_lib.make_train_step, metrics_lib.progress_bar

  def create_dataset(*a, **k):  # the real iterator, its class's __next__ timed (next() looks it up on the type)
    dataset = real_create(*a, **k)

    class Timed:
      def __iter__(self):
        it = iter(dataset)
        cls = type(it)
        if not getattr(cls, "_timed", False):
          cls.__next__, cls._timed = timed("input", cls.__next__), True
        return it
    return Timed()

  data_pipeline.create_dataset = create_dataset
  data_pipeline.global_batch = timed("transfer", data_pipeline.global_batch)

  step_lib.make_train_step = lambda *a, **k: timed("dispatch", real_make_step(*a, **k))

  def bar(total, initial, enabled=True):
    b = real_bar(total, initial, enabled=False)
    update = b.update
    b.update = lambda n=1: (ends.append(time.perf_counter()), update(n))
    return b
  metrics_lib.progress_bar = bar

  with tempfile.TemporaryDirectory() as workdir:
    t0 = time.perf_counter()
    evaluators.train(config, workdir, list_outputs=False)
    total = time.perf_counter() - t0
  skip = 5
  interval = statistics.mean(b - a for a, b in zip(ends[skip:], ends[skip + 1:]))
  ms = {k: 1e3 * statistics.mean(v[skip + 1:]) for k, v in parts.items()}
  row = {"benchmark": "profile_loop", "steps": args.steps, "step_interval_ms": round(1e3 * interval, 2),
         **{f"{k}_ms": round(v, 2) for k, v in ms.items()},
         "other_ms": round(1e3 * interval - sum(ms.values()), 2), "loop_steps_per_sec": round(1 / interval, 3)}
  if args.grid:
    row["final_grid_and_routing_map_s"] = round(total - (ends[-1] - t0), 1)
  print(json.dumps(row))


if __name__ == "__main__":
  main()
