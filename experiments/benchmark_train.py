"""Training (and sampling) speed: the tiny config's variants and DiT-MoE-S/2-shaped configs, against the matmul rate.

Suites (`--suite tiny|s2|both`)
  tiny: the tiny config (configs/ec_dit_tiny.py) at matched activated compute:
    expert choice (ec), token choice top-2 (tc), dense FFN of width 2 x 4d
    (dense), and ec trained with AdamW alone (ec_adamw, to show what Muon costs).
    Steps/s of the jitted train step (forward, backward, the config's optimizer,
    EMA) at batch 32 on batches prepared beforehand, and images/s of
    `TextToImagePipeline.generate` with the config's sampler (`--no_sample` skips it).
  s2: DiT-MoE-S/2-8E2A shapes (experiments/train_shapes.py: dense SwiGLU 10d,
    expert choice cf 2, token choice top-2 cf 2, dropless token choice), batch 8,
    forward + backward + AdamW + EMA on random latents and labels. For each: the
    median step time and model FLOPs/s (counted analytically, train_shapes.py)
    divided by the rate of a jitted 2048 x 2048 float32 jnp.dot timed in the
    same rounds ("vs matmul"; all variants interleaved, see `run_s2`), and the activated FLOPs per token of the network
    and of its FFN alone (equal FFN FLOPs = matched activated compute).
    `xla_flops` is XLA's cost analysis of the compiled step, for comparison (it
    counts what is computed, including padding slots, elementwise ops and the optimizer).

How
  Everything is compiled and warmed up first. Then `--rounds` rounds; in each
  round the matmul and every variant run (`--steps` train steps, one sampling
  batch) in a rotated order, so machine noise hits all alike. Medians over rounds.

The loop against the step (`--loop`)
  The real training loop (`ec_dit.training.loop.train`: the ShapesWorld input pipeline
  rendering on the same cores, device transfers, NaN checks, logging, checkpoints) on
  the tiny default, `--steps` steps per round (default 200), resuming in one workdir,
  interleaved round by round with the bare jitted step on batches made beforehand and
  the matmul. The loop's rate is timed between its progress-bar updates from the
  third step of each round to the last (the first loads the compiled step), so it
  counts what a long run pays per step; sample grids are off (their share of a
  full run is in docs/benchmarks.md). Prints both rates and their ratio.

Host memory (`--host_malloc reuse|default`)
  `reuse` (the default) sets the process's malloc as `python -m ec_dit.main` does
  (ec_dit/host_memory.py: XLA:CPU's per-step temporaries are reused, not page-faulted
  in every step); `default` leaves glibc's malloc as it is.

Old vs new (`--ref_tree DIR`)
  Trains the tiny default (ec) with the source tree DIR (e.g. an older checkout:
  `git worktree add /tmp/ref_main <commit>`) and with this one, each in its own
  long-lived subprocess (PYTHONPATH = its tree) that compiles once; they then
  take turns, one timing round at a time, so they never run together. Each tree
  runs as its own `ec_dit.main` would (a tree without ec_dit/host_memory.py keeps
  glibc's malloc); a third process runs this tree with `--host_malloc default`,
  to separate the code's speedup from the allocator's. Prints the median steps/s
  of each and the ratios to the old.

Usage
  python experiments/benchmark_train.py                  # both suites, ~30 minutes on 2 busy cores
  python experiments/benchmark_train.py --suite s2 --rounds 3
  python experiments/benchmark_train.py --suite tiny --quick
  python experiments/benchmark_train.py --ref_tree /tmp/ref_main --rounds 9
  python experiments/benchmark_train.py --loop --rounds 3            # real loop vs bare step, ~10 minutes

Output: a table per suite, then JSON lines starting with {"benchmark": "train_tiny",
{"benchmark": "train_s2", {"benchmark": "train_tiny_vs_ref" or {"benchmark": "train_loop_vs_step".
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

if "--worker" not in sys.argv:  # this tree's ec_dit, not an installed copy (a worker's PYTHONPATH names its tree)
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import ec_dit  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from ec_dit import data, tokenizer as tokenizer_lib  # noqa: E402
from ec_dit.inference import TextToImagePipeline  # noqa: E402
from ec_dit.training import (loop as loop_lib, metrics as metrics_lib, optimizers,  # noqa: E402
                             state as state_lib, step as step_lib)

import train_shapes  # noqa: E402

TREE = pathlib.Path(__file__).resolve().parents[1]
TINY_VARIANTS = ("ec", "tc", "dense", "ec_adamw")


def tiny_config(tree, variant):
  """The tiny config's variant (None or "ec": expert choice); "ec_adamw" trains it with AdamW alone."""
  config = train_shapes.load_module(tree, "ec_dit_tiny").get_config(
      None if variant in ("ec", "ec_adamw") else variant)
  if variant == "ec_adamw":
    config.optimizer = "adamw"
  return config


def xla_flops(compiled) -> float:
  """FLOPs of a compiled computation by XLA's cost analysis (nan when unavailable)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", float("nan")))


class Trainer:
  """A compiled train step with its state and prepared batches; `steps(n)` returns steps/s."""

  def __init__(self, config, batches):
    self.config = config
    tx = optimizers.make_optimizer(config)
    abstract = state_lib.abstract_state(config, tx)
    self.state, self.ema = state_lib.init_state(config, tx, abstract)
    step_fn = step_lib.make_train_step(config, abstract, tx)
    self.batches = batches
    self.compiled = step_fn.lower(self.state, self.ema, batches[0]).compile()
    self.steps(2)  # warm up

  def steps(self, n):
    t = time.perf_counter()
    for i in range(n):
      self.state, self.ema, metrics = self.compiled(self.state, self.ema, self.batches[i % len(self.batches)])
    jax.block_until_ready(metrics["loss"])
    return n / (time.perf_counter() - t)


def tiny_trainer(tree, variant, num_batches=8):
  """A Trainer of the tiny config's `variant` on ShapesWorld batches made beforehand."""
  config = tiny_config(tree, variant)
  tokenizer = tokenizer_lib.tokenizer_from_config(config)
  it = iter(data.create_dataset(config.input, batch_size=config.batch_size, tokenize=tokenizer.encode, seed=0))
  return Trainer(config, [next(it) for _ in range(num_batches)])


def s2_trainer(variant):
  """A Trainer of a DiT-MoE-S/2-shaped variant on random latents and labels."""
  config = train_shapes.s2_config(TREE, variant)
  batches = [train_shapes.s2_batch(config, seed) for seed in range(4)]
  return Trainer(config, batches)


class Sampler:
  """The tiny variant's sampling pipeline on its EMA weights; `__call__` returns images/s."""

  def __init__(self, trainer, batch):
    config = trainer.config
    self.pipe = TextToImagePipeline(config, jax.tree.map(np.asarray, trainer.ema), batch_size=batch)
    self.prompts = (list(config.sample.prompts) * (batch // len(config.sample.prompts) + 1))[:batch]
    self()

  def __call__(self):
    t = time.perf_counter()
    images = self.pipe.generate(self.prompts, seed=0)
    return len(images) / (time.perf_counter() - t)


class LoopRunner:
  """The real training loop of the tiny default, `steps(n)` more steps per call in one workdir (it resumes)."""

  def __init__(self, tree, workdir):
    self.config = tiny_config(tree, "ec")
    self.config.eval_every_steps = 0  # grids are timed apart (docs/benchmarks.md)
    self.config.num_train_steps = 0
    self.workdir, self.times = workdir, []
    real_bar = metrics_lib.progress_bar

    def timed_bar(total, initial, enabled=True):  # the loop's own progress bar, recording each step's end
      bar = real_bar(total, initial, enabled=False)
      update = bar.update
      bar.update = lambda n=1: (self.times.append(time.perf_counter()), update(n))
      return bar
    metrics_lib.progress_bar = timed_bar

  def steps(self, n):
    self.config.num_train_steps += n + 2
    self.times = []
    loop_lib.train(self.config, self.workdir, list_outputs=False)
    return (len(self.times) - 3) / (self.times[-1] - self.times[2])


def run_loop(args):
  """--loop: the real loop, the bare step and the matmul, interleaved; rates, ratio, JSON line."""
  jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="bench_loop_cache_"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  matmul, bare = train_shapes.Matmul(), tiny_trainer(TREE, "ec")
  with tempfile.TemporaryDirectory() as workdir:
    runner = LoopRunner(TREE, workdir)
    runner.steps(2)  # compiles, writes the first checkpoint
    timers = {"matmul": matmul.rate, "step": lambda: bare.steps(args.steps), "loop": lambda: runner.steps(args.steps)}
    res = interleave(timers, args.rounds)
  med = {k: statistics.median(v) for k, v in res.items()}
  print(f"tiny default, {args.rounds} interleaved rounds of {args.steps} steps: bare step {med['step']:.3f} steps/s, "
        f"training loop {med['loop']:.3f} steps/s, loop/step = {med['loop'] / med['step']:.3f}; "
        f"float32 matmul {train_shapes.MATMUL_N}^2 {med['matmul'] / 1e9:.1f} GFLOP/s")
  print(json.dumps({"benchmark": "train_loop_vs_step", "rounds": args.rounds, "steps_per_round": args.steps,
                    "step_steps_per_sec": round(med["step"], 3), "loop_steps_per_sec": round(med["loop"], 3),
                    "loop_vs_step": round(med["loop"] / med["step"], 3), "matmul_flops_per_sec": med["matmul"],
                    "loop_vs_step_per_round": [round(a / b, 3) for a, b in zip(res["loop"], res["step"])],
                    **{f"{k}_rounds": [round(x, 3) for x in v] for k, v in res.items() if k != "matmul"}}))


def interleave(timers: dict, rounds: int) -> dict:
  """{name: [one value per round]} of every timer, called in a rotated order each round."""
  names = list(timers)
  out = {k: [] for k in names}
  for r in range(rounds):
    k = r % len(names)
    for name in names[k:] + names[:k]:
      out[name].append(timers[name]())
  return out


def run_suites(args):
  """Builds the selected suites, times them interleaved with the matmul, prints tables and JSON lines."""
  matmul = train_shapes.Matmul()
  print(f"ec_dit from {pathlib.Path(ec_dit.__file__).parent}", flush=True)
  if args.suite in ("tiny", "both"):
    tiny = {v: tiny_trainer(TREE, v) for v in TINY_VARIANTS}
    timers = {"matmul": matmul.rate, **{v: (lambda tr=tr: tr.steps(args.steps)) for v, tr in tiny.items()}}
    if not args.no_sample:
      timers.update({f"{v}/sample": Sampler(tr, args.sample_batch) for v, tr in tiny.items()})
    res = {k: statistics.median(vals) for k, vals in interleave(timers, args.rounds).items()}
    print(f"float32 matmul {train_shapes.MATMUL_N}^2: {res['matmul'] / 1e9:.1f} GFLOP/s (median)")
    print_tiny(tiny, res, res["matmul"], args)
  if args.suite in ("s2", "both"):
    run_s2(matmul, args)


def run_s2(matmul, args):
  """The S/2 variants and the matmul, interleaved in the same rounds (all four held at once: ~17 GB).

  With `--s2_sequential` (for smaller machines) the variants are built one at a
  time, each interleaved with the matmul only: their ratios to the matmul rate
  hold, but step times of different variants then come from different minutes.
  """
  rows, rates = [], []
  groups = ([[v] for v in train_shapes.S2_VARIANTS] if args.s2_sequential else [list(train_shapes.S2_VARIANTS)])
  for group in groups:
    trainers = {v: s2_trainer(v) for v in group}
    timers = {"matmul": matmul.rate}
    timers.update({v: (lambda tr=tr: tr.steps(args.s2_steps)) for v, tr in trainers.items()})
    res = interleave(timers, args.rounds)
    rates.append(statistics.median(res["matmul"]))
    for v, tr in trainers.items():
      rows.append(s2_row(v, tr, statistics.median(res[v]), rates[-1]))
      print(json.dumps(rows[-1]), flush=True)
    del trainers, timers
  print_s2(rows)
  print(json.dumps({"benchmark": "train_s2", "rounds": args.rounds, "steps_per_round": args.s2_steps,
                    "interleaved": not args.s2_sequential, "matmul_flops_per_sec": statistics.median(rates),
                    "variants": rows}))


def print_tiny(tiny, res, rate, args):
  rows = []
  print(f"{'variant':<9}{'steps/s':>9}{'train img/s':>13}{'sample img/s':>14}{'vs dense':>10}{'xla vs mm':>11}")
  dense = res["dense"] if "dense" in res else float("nan")
  for v, tr in tiny.items():
    c, steps = tr.config, res[v]
    flops = xla_flops(tr.compiled)
    sample = res.get(f"{v}/sample", float("nan"))
    rows.append({"variant": v, "batch_size": c.batch_size, "steps_per_sec": round(steps, 3),
                 "train_images_per_sec": round(steps * c.batch_size, 1), "sample_images_per_sec": round(sample, 2),
                 "sampler": c.sample.sampler, "sample_steps": c.sample.num_steps,
                 "train_time_vs_dense": round(dense / steps, 3), "xla_flops_per_step": flops,
                 "xla_flops_vs_matmul": round(flops * steps / rate, 3)})
    print(f"{v:<9}{steps:>9.2f}{steps * c.batch_size:>13.1f}{sample:>14.2f}{dense / steps:>9.2f}x"
          f"{flops * steps / rate:>11.3f}")
  print(json.dumps({"benchmark": "train_tiny", "rounds": args.rounds, "steps_per_round": args.steps,
                    "matmul_flops_per_sec": rate, "variants": rows}))


def s2_row(v, tr, steps, rate):
  """The JSON row of an S/2 variant timed at `steps` steps/s next to a matmul rate of `rate` FLOP/s."""
  f = train_shapes.model_flops(tr.config)
  achieved = f["train_per_step"] * steps
  return {"variant": v, "batch_size": tr.config.batch_size, "step_ms": round(1e3 / steps, 1),
          "fwd_flops_per_token": f["fwd_per_token"], "ffn_fwd_flops_per_token": f["ffn_fwd_per_token"],
          "model_flops_per_step": f["train_per_step"], "model_flops_per_sec": achieved, "matmul_flops_per_sec": rate,
          "model_flops_vs_matmul": round(achieved / rate, 3), "xla_flops_per_step": xla_flops(tr.compiled)}


def print_s2(rows):
  print(f"{'variant':<12}{'ms/step':>9}{'GFLOP/tok':>11}{'FFN GF/tok':>12}{'model GF/s':>12}{'matmul GF/s':>13}"
        f"{'vs matmul':>11}{'xla GF/step':>13}")
  for r in rows:
    print(f"{r['variant']:<12}{r['step_ms']:>9.1f}{r['fwd_flops_per_token'] / 1e9:>11.4f}"
          f"{r['ffn_fwd_flops_per_token'] / 1e9:>12.4f}{r['model_flops_per_sec'] / 1e9:>12.1f}"
          f"{r['matmul_flops_per_sec'] / 1e9:>13.1f}{r['model_flops_vs_matmul']:>11.3f}"
          f"{r['xla_flops_per_step'] / 1e9:>13.1f}")


def set_host_malloc(choice: str) -> bool:
  """Applies `ec_dit.host_memory.reuse_freed_memory()` for "reuse" when the imported ec_dit has it (an old
  --ref_tree may not); True if it was applied. Call before JAX's first computation."""
  if choice != "reuse" or importlib.util.find_spec("ec_dit.host_memory") is None:
    return False
  return importlib.import_module("ec_dit.host_memory").reuse_freed_memory()


def worker(tree, host_malloc):
  """Subprocess side of --ref_tree: compile the tiny default of `tree`, then time `n` steps per stdin line."""
  set_host_malloc(host_malloc)
  trainer = tiny_trainer(pathlib.Path(tree), "ec")
  print(f"ready {ec_dit.__file__}", flush=True)
  for line in sys.stdin:
    print(trainer.steps(int(line)), flush=True)


def compare_trees(args):
  """--ref_tree: alternating subprocesses of the reference tree and this one, medians and their ratio."""
  procs = {}
  runs = (("ref", pathlib.Path(args.ref_tree).resolve(), "reuse"), ("new", TREE, "reuse"),
          ("new_default_malloc", TREE, "default"))
  for name, tree, host_malloc in runs:
    env = dict(os.environ, PYTHONPATH=str(tree))
    procs[name] = subprocess.Popen([sys.executable, __file__, "--worker", str(tree), "--host_malloc", host_malloc],
                                   env=env, cwd=str(tree), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  for name, p in procs.items():  # compile one after the other: each waits for its own "ready"
    line = p.stdout.readline()
    while line and not line.startswith("ready"):
      line = p.stdout.readline()
    print(f"{name}: {line.strip()}")

  def timer(p):
    p.stdin.write(f"{args.steps}\n")
    p.stdin.flush()
    return float(p.stdout.readline())

  res = interleave({name: (lambda p=p: timer(p)) for name, p in procs.items()}, args.rounds)
  for p in procs.values():
    p.stdin.close()
    p.wait()
  med = {name: statistics.median(values) for name, values in res.items()}
  ref, new, new_default = med["ref"], med["new"], med["new_default_malloc"]
  print(f"tiny default (ec) steps/s, medians of {args.rounds} rounds of {args.steps} steps:")
  print(f"  ref {args.ref_tree}: {ref:.3f}   new {TREE}: {new:.3f}   new/ref = {new / ref:.3f}x")
  print(f"  new with glibc's default malloc: {new_default:.3f}   = {new_default / ref:.3f}x ref")
  print(json.dumps({"benchmark": "train_tiny_vs_ref", "ref_tree": str(args.ref_tree), "new_tree": str(TREE),
                    "rounds": args.rounds, "steps_per_round": args.steps, "ref_steps_per_sec": round(ref, 3),
                    "new_steps_per_sec": round(new, 3), "speedup": round(new / ref, 3),
                    "new_default_malloc_steps_per_sec": round(new_default, 3),
                    "speedup_default_malloc": round(new_default / ref, 3),
                    **{f"{name}_rounds": [round(x, 3) for x in values] for name, values in res.items()}}))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--suite", choices=("tiny", "s2", "both"), default="both")
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--s2_steps", type=int, default=1, help="S/2 train steps per round (seconds each on a CPU)")
  parser.add_argument("--s2_sequential", action="store_true",
                      help="build the S/2 variants one at a time (less memory; variants not interleaved)")
  parser.add_argument("--sample_batch", type=int, default=64)
  parser.add_argument("--no_sample", action="store_true", help="tiny suite: time training only")
  parser.add_argument("--ref_tree", help="compare the tiny default's steps/s of this source tree with the current one")
  parser.add_argument("--host_malloc", choices=("reuse", "default"), default="reuse",
                      help="reuse: malloc set as `python -m ec_dit.main` sets it (ec_dit/host_memory.py)")
  parser.add_argument("--loop", action="store_true", help="the real training loop against the bare step (tiny)")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.quick:
    args.rounds, args.steps, args.sample_batch = 2, 3, 16
  if args.worker:
    worker(args.worker, args.host_malloc)
  elif args.ref_tree:
    compare_trees(args)
  elif args.loop:
    if "--steps" not in sys.argv:
      args.steps = 200
    print(f"host malloc: {args.host_malloc} (applied: {set_host_malloc(args.host_malloc)})", flush=True)
    run_loop(args)
  else:
    print(f"host malloc: {args.host_malloc} (applied: {set_host_malloc(args.host_malloc)})", flush=True)
    run_suites(args)


if __name__ == "__main__":
  main()
