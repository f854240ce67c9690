"""The router comparison in miniature: expert choice vs token choice vs dense at matched activated compute.

EC-DiT's claim: expert-choice routing converges faster than dense and token-choice
models with the same activated compute. This script trains the tiny ShapesWorld
config in its variants (configs/ec_dit_tiny.py)

  ec        expert choice, capacity factor 2 (the default)
  tc        token choice top-2, no shared experts (dropless)
  dit_moe   DiT-MoE's recipe: token choice top-2 + 2 shared experts, balance loss 0.01
  dense     a dense FFN of width 2 x 4d at the MoE positions

with the same seeds and data order (run seed s: config.seed = config.input.data_seed = s
for every variant), several seeds each, all for the same number of steps. Then:

  * loss curves (the velocity MSE, without auxiliary losses, mean over seeds with the
    min-max band) against steps and against wall clock: compare_routers.png;
  * the GenEval-style ShapesWorld score at equal steps (the last checkpoint) and at
    equal wall clock W (W = the mean training time of the fastest variant; each run is
    scored at its last checkpoint reached within W): compare_routers.md (a table and a
    verdict) and compare_routers.jsonl (one JSON object per variant and budget).

Wall clock is steps x each variant's median train-step time, measured by this script in
one process with the variants interleaved (`--timing_rounds` rounds of `--timing_steps`
steps each, rotated order, after compiling), and cached in OUT/step_times.json: the runs
themselves may share the machine with other work, so their own loop times (kept in the
table as "loop time") are not comparable between variants. Delete step_times.json to
re-measure (e.g. after a speed change; the trained runs need not be redone).

It runs unattended and resumes where it stopped: each run has its own workdir
(OUT/runs/<variant>_s<seed>), training resumes from its Orbax checkpoints, a finished
run is marked with train_done.json and every score is cached as JSON. Rerun the same
command after an interruption.

  python experiments/compare_routers.py --out runs/compare_routers                # the full comparison
  python experiments/compare_routers.py --out /tmp/cr --steps 30 --seeds 0 --per_task 2 --images_per_prompt 1
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import time

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# The library's entry points, in one place:
import jax

from ec_dit import configs, data, tokenizer as tokenizer_lib
from ec_dit.geneval import harness, prompts as prompts_lib, scores as scores_lib
from ec_dit.geneval.generate import evaluate_run as evaluate, generate_into
from ec_dit.inference import TextToImagePipeline
from ec_dit.training import optimizers, state as state_lib, step as step_lib
from ec_dit.training.loop import train

REPO = pathlib.Path(__file__).resolve().parents[1]
VARIANTS = ("ec", "tc", "dit_moe", "dense")
# The budget: at the step times of this 2-core machine alone (after issue 21: ec 4.6, dense 4.6, tc 3.6,
# dit_moe 3.2 steps/s) 700 steps x 4 variants is ~12 min of training per seed; scoring 308 images per run
# at two budgets ~1.5 min per run; compiling and timing ~6 min: ~70 min for 3 seeds, ~45 for 2.
DEFAULT_STEPS = 700
TASK_ORDER = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def load_config(variant: str, args, seed: int):
  tiny = REPO / "configs" / "ec_dit_tiny.py"
  config = configs.load(str(tiny) if variant == "ec" else f"{tiny}:{variant}", validate=False)
  config.num_train_steps = args.steps
  config.warmup_steps = min(config.warmup_steps, max(1, args.steps // 10))
  config.seed = seed
  config.input.data_seed = seed
  config.log_every_steps = max(1, min(10, args.steps // 10))
  config.checkpoint_every_steps = max(1, args.steps // args.checkpoints)
  config.keep_checkpoints = args.checkpoints + 2  # keep them all: the equal-wall-clock score needs one
  config.eval_every_steps = 0
  config.geneval.per_task = args.per_task
  config.geneval.images_per_prompt = args.images_per_prompt
  return config


def read_log(workdir: str) -> dict[int, dict]:
  """step -> the logged row (the last one for a step: a resumed run rewrites the steps after its checkpoint)."""
  rows = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      rows[row["step"]] = row
  return rows


def loop_curve(workdir: str):
  """(steps, mse, cumulative loop seconds) of a run from its metrics.jsonl.

  The first interval keeps its compilation. A later interval slower than a third of
  the run's median rate is a restart after an interruption (recompiling, restoring):
  it is counted at the median rate, so an interrupted run is not charged for it.
  """
  rows = read_log(workdir)
  steps = sorted(rows)
  rates = np.array([max(rows[s]["steps_per_sec"], 1e-9) for s in steps])
  median = float(np.median(rates))
  seconds, last, total = [], 0, 0.0
  for i, s in enumerate(steps):
    rate = median if i > 0 and rates[i] < median / 3 else rates[i]
    total += (s - last) / rate
    seconds.append(total)
    last = s
  return np.array(steps), np.array([rows[s]["mse"] for s in steps]), np.array(seconds)


def measure_step_times(args, variants) -> dict[str, float]:
  """Median seconds per train step of each variant, interleaved in this process; cached in OUT/step_times.json.

  Each variant's jitted step (forward, backward, optimizer, EMA) is compiled and run
  once, then `args.timing_rounds` rounds time `args.timing_steps` steps of every variant
  in a rotated order on prepared batches, so machine noise hits all alike.
  """
  path = os.path.join(args.out, "step_times.json")
  cached = {}
  if os.path.exists(path):
    with open(path) as f:
      cached = json.load(f)
  todo = [v for v in variants if v not in cached.get("seconds_per_step", {})]
  if not todo:
    return cached["seconds_per_step"]
  print(f"== timing train steps of {todo}, interleaved", flush=True)
  runners = {}
  for v in todo:
    config = load_config(v, args, 0)
    tokenize = tokenizer_lib.tokenizer_from_config(config).encode
    batches = iter(data.create_dataset(config.input, batch_size=config.batch_size, tokenize=tokenize, seed=0))
    tx = optimizers.make_optimizer(config)
    graphdef, state, ema = state_lib.init_state(config, tx)
    runners[v] = dict(step=step_lib.make_train_step(config, graphdef, tx), state=state, ema=ema,
                      batches=[next(batches) for _ in range(4)])
  samples = {v: [] for v in todo}

  def run(v, n):
    r = runners[v]
    start = time.perf_counter()
    for i in range(n):
      r["state"], r["ema"], metrics = r["step"](r["state"], r["ema"], r["batches"][i % 4])
    jax.block_until_ready(metrics["loss"])
    return (time.perf_counter() - start) / n

  for v in todo:
    run(v, 2)  # compile and warm up
  for k in range(args.timing_rounds):
    for v in todo[k % len(todo):] + todo[:k % len(todo)]:
      samples[v].append(run(v, args.timing_steps))
  result = dict(cached.get("seconds_per_step", {}), **{v: statistics.median(samples[v]) for v in todo})
  os.makedirs(args.out, exist_ok=True)
  with open(path, "w") as f:
    json.dump({"seconds_per_step": result, "samples": dict(cached.get("samples", {}), **samples),
               "rounds": args.timing_rounds, "steps_per_round": args.timing_steps}, f, indent=2)
  return result


def curve(workdir: str, seconds_per_step: float):
  """(steps, mse, seconds, loop seconds): wall clock = steps x the interleaved step time."""
  steps, mse, loop_seconds = loop_curve(workdir)
  return steps, mse, steps * seconds_per_step, loop_seconds


def checkpoint_steps(workdir: str) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(p) for p in os.listdir(d) if p.isdigit())


def score_final(config, workdir: str) -> dict:
  """GenEval-style score of the last checkpoint (the library's `evaluate`), cached in workdir/geneval."""
  path = os.path.join(workdir, "geneval", "summary.json")
  if not os.path.exists(path):
    evaluate(config, workdir)
  with open(path) as f:
    return json.load(f)


def score_at(config, workdir: str, step: int) -> dict:
  """GenEval-style score of the checkpoint at `step` (EMA weights), cached in workdir/geneval_step_<step>."""
  if step == config.num_train_steps:
    return score_final(config, workdir)
  out = os.path.join(workdir, f"geneval_step_{step}")
  path = os.path.join(out, "summary.json")
  if not os.path.exists(path):
    g = config.geneval
    pipe = TextToImagePipeline.from_run(workdir, step=step, batch_size=g.batch_size)
    suite = prompts_lib.suite_from_config(g)
    os.makedirs(out, exist_ok=True)
    generate_into(pipe, suite, os.path.join(out, "images"), n=g.images_per_prompt, seed=config.sample.seed,
                  progress=False, sample=config.sample)
    scores = scores_lib.summarize(harness.evaluate_images(os.path.join(out, "images"),
                                                          os.path.join(out, "results.jsonl")))
    with open(path, "w") as f:
      json.dump(scores, f, indent=2)
  with open(path) as f:
    return json.load(f)


def train_all(args, runs):
  """Trains every run not yet done, seed by seed (so an early stop still leaves whole seeds)."""
  for variant, seed, workdir in runs:
    done = os.path.join(workdir, "train_done.json")
    if os.path.exists(done):
      continue
    print(f"== train {variant} seed {seed} -> {workdir}", flush=True)
    start = time.time()
    result = train(load_config(variant, args, seed), workdir)
    if result.get("preempted"):
      raise SystemExit("preempted (SIGTERM): rerun the same command to resume")
    with open(done, "w") as f:
      json.dump({"seconds_this_session": time.time() - start, "last_metrics": result}, f)


def _mean_sd(values):
  values = [v for v in values if v is not None]
  if not values:
    return None, None
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(mean, sd):
  return "-" if mean is None else f"{100 * mean:.1f} ± {100 * sd:.1f}"


def summarise(args, runs):
  """Scores at equal steps and equal wall clock; writes the PNG, the table and the JSON lines."""
  step_times = measure_step_times(args, sorted({v for v, _, _ in runs}))
  by_variant: dict[str, list] = {}
  for variant, seed, workdir in runs:
    config = load_config(variant, args, seed)
    steps, mse, seconds, loop_seconds = curve(workdir, step_times[variant])
    by_variant.setdefault(variant, []).append(dict(seed=seed, workdir=workdir, config=config, steps=steps,
                                                   mse=mse, seconds=seconds, loop_seconds=loop_seconds))
  # Equal wall clock: the mean training time of the fastest variant (every variant has run that long).
  budget = min(statistics.fmean(r["seconds"][-1] for r in rs) for rs in by_variant.values())
  for variant, rs in by_variant.items():
    for r in rs:
      r["final"] = score_final(r["config"], r["workdir"])
      reached = [s for s in checkpoint_steps(r["workdir"])
                 if np.interp(s, r["steps"], r["seconds"]) <= budget + 1e-6]
      r["step_at_budget"] = max(reached) if reached else None
      r["at_budget"] = score_at(r["config"], r["workdir"], r["step_at_budget"]) if reached else None
  rows = []
  for variant, rs in by_variant.items():
    sps = 1.0 / step_times[variant]
    final = _mean_sd([r["final"]["overall"] for r in rs])
    at_w = _mean_sd([r["at_budget"]["overall"] if r["at_budget"] else None for r in rs])
    tasks_final = {t: statistics.fmean(r["final"].get(t, 0.0) for r in rs) for t in TASK_ORDER}
    row = dict(variant=variant, seeds=[r["seed"] for r in rs], steps=args.steps, steps_per_sec=sps,
               train_seconds=statistics.fmean(r["seconds"][-1] for r in rs),
               loop_seconds=statistics.fmean(r["loop_seconds"][-1] for r in rs),
               final_mse=statistics.fmean(float(np.mean(r["mse"][-5:])) for r in rs),
               score_equal_steps=final[0], score_equal_steps_sd=final[1], tasks_equal_steps=tasks_final,
               wall_clock_budget_seconds=budget, steps_at_budget=[r["step_at_budget"] for r in rs],
               score_equal_wall_clock=at_w[0], score_equal_wall_clock_sd=at_w[1],
               per_seed_equal_steps=[r["final"]["overall"] for r in rs],
               per_seed_equal_wall_clock=[r["at_budget"]["overall"] if r["at_budget"] else None for r in rs])
    rows.append(row)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "compare_routers.jsonl"), "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  plot(by_variant, budget, os.path.join(args.out, "compare_routers.png"))
  table = format_table(rows, args, budget)
  with open(os.path.join(args.out, "compare_routers.md"), "w") as f:
    f.write(table + "\n")
  print(table, flush=True)
  for row in rows:
    print(json.dumps({"compare_routers": row["variant"], "equal_steps": row["score_equal_steps"],
                      "equal_wall_clock": row["score_equal_wall_clock"]}), flush=True)
  return rows


def format_table(rows, args, budget) -> str:
  lines = [f"Tiny ShapesWorld, {args.steps} steps, seeds {args.seeds}; GenEval-style score (% of tasks, "
           f"mean ± sd over seeds; per_task {args.per_task}, images per prompt {args.images_per_prompt}). "
           f"Equal wall clock W = {budget:.0f} s of training at the interleaved step times (steps/s; "
           f"loop time: the runs' own time on a shared machine, for reference).", "",
           "| variant | steps/s | train time (s) | loop time (s) | final MSE | score @ equal steps | "
           "steps within W | score @ equal wall clock |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    steps_w = "/".join("-" if s is None else str(s) for s in r["steps_at_budget"])
    lines.append(f"| {r['variant']} | {r['steps_per_sec']:.2f} | {r['train_seconds']:.0f} | {r['loop_seconds']:.0f} | "
                 f"{r['final_mse']:.4f} | "
                 f"{_fmt(r['score_equal_steps'], r['score_equal_steps_sd'])} | {steps_w} | "
                 f"{_fmt(r['score_equal_wall_clock'], r['score_equal_wall_clock_sd'])} |")
  lines.append("\n\"-\": no checkpoint of that run within W (its first checkpoint came later).")
  by = {r["variant"]: r for r in rows}
  if "ec" in by and len(by) > 1:
    for key, name in (("score_equal_steps", "equal steps"), ("score_equal_wall_clock", "equal wall clock")):
      others = {v: r[key] for v, r in by.items() if v != "ec" and r[key] is not None}
      if by["ec"][key] is None or not others:
        continue
      beaten = [v for v, s in others.items() if s >= by["ec"][key]]
      verdict = ("expert choice scores highest" if not beaten else
                 f"expert choice does not score highest ({', '.join(beaten)} score as high or higher)")
      lines.append(f"\nAt {name}: {verdict}.")
  return "\n".join(lines)


def _smooth(y, k=5):
  if len(y) < k:
    return y
  kernel = np.ones(k) / k
  padded = np.concatenate([np.full(k // 2, y[0]), y, np.full(k - 1 - k // 2, y[-1])])
  return np.convolve(padded, kernel, mode="valid")


def plot(by_variant, budget, path):
  fig = Figure(figsize=(11, 4), layout="constrained")
  FigureCanvasAgg(fig)
  ax_steps, ax_time = fig.subplots(1, 2, sharey=True)
  for i, (variant, rs) in enumerate(by_variant.items()):
    n = min(len(r["steps"]) for r in rs)
    steps = rs[0]["steps"][:n]
    mse = np.stack([_smooth(r["mse"][:n]) for r in rs])
    seconds = np.mean(np.stack([r["seconds"][:n] for r in rs]), axis=0)
    for ax, x in ((ax_steps, steps), (ax_time, seconds)):
      ax.plot(x, mse.mean(0), color=f"C{i}", label=f"{variant} ({len(rs)} seed{'s' if len(rs) > 1 else ''})")
      ax.fill_between(x, mse.min(0), mse.max(0), color=f"C{i}", alpha=0.2)
  ax_time.axvline(budget, color="k", linestyle=":", linewidth=1, label="equal wall clock W")
  ax_steps.set_xlabel("training step")
  ax_time.set_xlabel("training wall clock (s): steps x interleaved step time")
  ax_steps.set_ylabel("velocity MSE (smoothed)")
  for ax in (ax_steps, ax_time):
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle("Router comparison, tiny ShapesWorld (mean over seeds, band = min..max)", fontsize=10)
  fig.savefig(path, dpi=110)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="runs/compare_routers")
  parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="training steps of every run")
  parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--checkpoints", type=int, default=20,
                      help="checkpoints per run, all kept (the granularity of the equal-wall-clock score)")
  parser.add_argument("--per_task", type=int, default=25, help="GenEval-style prompts per task (25: 77 prompts)")
  parser.add_argument("--images_per_prompt", type=int, default=4)
  parser.add_argument("--timing_rounds", type=int, default=5, help="interleaved rounds timing the train steps")
  parser.add_argument("--timing_steps", type=int, default=20, help="train steps per variant per timing round")
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  variants = [v for v in args.variants.split(",") if v]
  unknown = set(variants) - set(VARIANTS)
  if unknown:
    parser.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
  runs = [(v, s, os.path.join(args.out, "runs", f"{v}_s{s}")) for s in seeds for v in variants]
  start = time.time()
  train_all(args, runs)
  summarise(args, runs)
  print(f"compare_routers: {time.time() - start:.0f} s this session; outputs in {args.out}", flush=True)


if __name__ == "__main__":
  main()
