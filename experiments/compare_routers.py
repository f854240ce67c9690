"""The router comparison in miniature, powered: expert choice vs token choice vs dense on a held-out loss.

EC-DiT's claim: at matched activated compute, expert-choice routing converges faster than
dense and token-choice models. This script trains the tiny ShapesWorld default
(configs/ec_dit_tiny.py: its model, recipe and full step budget) in these variants

  ec        expert choice, capacity factor 2, one routing group per image (the default)
  dense     a dense FFN of width 2 x 4d at the MoE positions
  tc        token choice top-2, no shared experts, dropless
  ec_batch  expert choice with one routing group over the whole batch (EC-DiT's setting)
  tc_cap2   token choice top-2 with capacity factor 2: the conventional MoE that drops tokens
  dit_moe   DiT-MoE's recipe: top-2 + 2 shared experts, balance loss 0.01 (--with_dit_moe)

and, the capacity-factor study, expert choice at capacity factors 1, 2 and 4 (ec_cf1, ec_cf2,
ec_cf4) for half the budget. Every variant runs from the same seeds and data order (seed s:
config.seed = config.input.data_seed = s). The primary metric is the held-out loss
(ec_dit.training.heldout: 256 ShapesWorld examples training never draws, 5 fixed t, fixed
noise, EMA weights) logged every --heldout_every steps; the second is the GenEval-style score.

Order (most informative pairs first): seed by seed, ec, dense, tc, ec_batch, tc_cap2; then the
capacity study seed by seed; then dit_moe. Each (variant, seed) is a cell with its own workdir
OUT/runs/<variant>_s<seed>; a finished cell (trained, scored) is recorded in
OUT/cells/<cell>.json, and after each one the report is rewritten: OUT/compare_routers.jsonl
(one line per run and held-out evaluation, one per score) and, with --docs (default: the repo's
docs/), compare_routers.{md,jsonl,png} there (experiments/compare_routers_report.py: paired
differences over seeds with 95% t-intervals, at equal steps and equal wall clock).

Wall clock is steps x each variant's median train-step time, measured first in one process
with the variants interleaved (OUT/step_times.json), since the runs share the machine. Equal
wall clock W = the full budget of the fastest variant; a slower variant is compared at the
held-out loss it had at W (interpolated between evaluations) and scored at its last
checkpoint within W.

Unattended and resumable: kill it at any time and rerun the same command; training resumes
from its checkpoints, finished cells and scores are cached.

  nohup nice -n 19 python experiments/compare_routers.py --out /work/runs32 > /work/runs32/log.txt 2>&1 &
  python experiments/compare_routers.py --out /work/runs32 --report_only --readme README.md   # docs + README
  python experiments/compare_routers.py --out /tmp/cr --steps 40 --seeds 0 --per_task 1 --images_per_prompt 1 \
      --heldout_every 20 --checkpoints 2 --timing_rounds 1 --timing_steps 2 --docs /tmp/cr   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import time

import jax

from ec_dit import configs, data, tokenizer as tokenizer_lib
from ec_dit.geneval import harness, prompts as prompts_lib, scores as scores_lib
from ec_dit.geneval.generate import evaluate_run, generate_into
from ec_dit.inference import TextToImagePipeline
from ec_dit.training import optimizers, state as state_lib, step as step_lib
from ec_dit.training.loop import train

import compare_routers_report as report

REPO = pathlib.Path(__file__).resolve().parents[1]
ROUTER_VARIANTS = ("ec", "dense", "tc", "ec_batch", "tc_cap2", "dit_moe")
CAPACITY_VARIANTS = {"ec_cf1": 1.0, "ec_cf2": 2.0, "ec_cf4": 4.0}


def tiny_config(variant: str, seed: int, steps: int | None, args):
  """The tiny default as the variant, seed s for init and data, the study's cadences; `steps` None = the default's."""
  tiny = REPO / "configs" / "ec_dit_tiny.py"
  config = configs.load(f"{tiny}:{'ec' if variant in CAPACITY_VARIANTS else variant}", validate=False)
  if variant in CAPACITY_VARIANTS:
    config.model.ffn.train_capacity_factor = config.model.ffn.eval_capacity_factor = CAPACITY_VARIANTS[variant]
  if steps is not None:
    config.num_train_steps = steps
    config.warmup_steps = min(config.warmup_steps, max(1, steps // 10))
    config.log_every_steps = min(config.log_every_steps, max(1, steps // 10))
  config.seed = config.input.data_seed = seed
  config.checkpoint_every_steps = max(1, config.num_train_steps // args.checkpoints)
  config.keep_checkpoints = args.checkpoints + 2  # all kept: the equal-wall-clock score needs one within W
  config.eval_every_steps = 0
  config.heldout.every_steps = args.heldout_every
  config.geneval.per_task = args.per_task
  config.geneval.images_per_prompt = args.images_per_prompt
  return config


def cells(args) -> list[dict]:
  """The study's cells in the order they run: the most informative pairs first."""
  full = args.steps
  half = None if full is None else max(1, full // 2)
  out = []
  for seed in args.seeds:
    out += [dict(study="routers", variant=v, seed=seed, steps=full) for v in args.variants if v != "dit_moe"]
  for seed in args.seeds:
    out += [dict(study="capacity", variant=v, seed=seed, steps=half, half=True) for v in args.capacity]
  if "dit_moe" in args.variants:
    out += [dict(study="routers", variant="dit_moe", seed=seed, steps=full) for seed in args.seeds]
  for c in out:
    c["name"] = f"{c['variant']}{'_half' if c.get('half') else ''}_s{c['seed']}"
    c["workdir"] = os.path.join(args.out, "runs", c["name"])
  return out


def cell_config(cell, args):
  config = tiny_config(cell["variant"], cell["seed"], cell["steps"], args)
  if cell.get("half") and cell["steps"] is None:
    config.num_train_steps //= 2
    config.checkpoint_every_steps = max(1, config.num_train_steps // args.checkpoints)
  return config


def measure_step_times(args, variants, name: str) -> dict[str, float]:
  """Median seconds per train step of each variant, interleaved in this process; cached in OUT/<name>.json.

  Each variant's jitted step (forward, backward, optimizer, EMA) is compiled and run once,
  then `args.timing_rounds` rounds time `args.timing_steps` steps of every variant in a
  rotated order on prepared batches, so the machine's load hits all alike.
  """
  path = os.path.join(args.out, f"{name}.json")
  if os.path.exists(path):
    with open(path) as f:
      cached = json.load(f)
    if set(variants) <= set(cached["seconds_per_step"]):
      return cached["seconds_per_step"]
  print(f"== timing train steps of {list(variants)}, interleaved", flush=True)
  runners = {}
  for v in variants:
    config = tiny_config(v, 0, None, args)
    tokenize = tokenizer_lib.tokenizer_from_config(config).encode
    batches = iter(data.create_dataset(config.input, batch_size=config.batch_size, tokenize=tokenize, seed=0))
    tx = optimizers.make_optimizer(config)
    abstract = state_lib.abstract_state(config, tx)
    state, ema = state_lib.init_state(config, tx, abstract)
    runners[v] = dict(step=step_lib.make_train_step(config, abstract, tx), state=state, ema=ema,
                      batches=[next(batches) for _ in range(4)])
  samples = {v: [] for v in variants}

  def run(v, n):
    r = runners[v]
    start = time.perf_counter()
    for i in range(n):
      r["state"], r["ema"], metrics = r["step"](r["state"], r["ema"], r["batches"][i % 4])
    jax.block_until_ready(metrics["loss"])
    return (time.perf_counter() - start) / n

  for v in variants:
    run(v, 2)  # compile and warm up
  order = list(variants)
  for k in range(args.timing_rounds):
    for v in order[k % len(order):] + order[:k % len(order)]:
      samples[v].append(run(v, args.timing_steps))
  result = {v: statistics.median(samples[v]) for v in variants}
  os.makedirs(args.out, exist_ok=True)
  _write_json(path, {"seconds_per_step": result, "samples": samples, "rounds": args.timing_rounds,
                     "steps_per_round": args.timing_steps})
  return result


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def score(config, workdir: str, step: int) -> float:
  """GenEval-style overall score of the checkpoint at `step` (EMA weights), cached in the workdir."""
  if step == config.num_train_steps:
    path = os.path.join(workdir, "geneval", "summary.json")
    if not os.path.exists(path):
      evaluate_run(config, workdir)
    with open(path) as f:
      return json.load(f)["overall"]
  out = os.path.join(workdir, f"geneval_step_{step}")
  path = os.path.join(out, "summary.json")
  if not os.path.exists(path):
    g = config.geneval
    pipe = TextToImagePipeline.from_run(workdir, step=step, batch_size=g.batch_size)
    generate_into(pipe, prompts_lib.suite_from_config(g), os.path.join(out, "images"), n=g.images_per_prompt,
                  seed=config.sample.seed, progress=False, sample=config.sample)
    _write_json(path, scores_lib.summarize(harness.evaluate_images(os.path.join(out, "images"),
                                                                   os.path.join(out, "results.jsonl"))))
  with open(path) as f:
    return json.load(f)["overall"]


def run_cell(cell, args, seconds_per_step: dict[str, float]) -> None:
  """Trains (resuming), scores and records one cell in OUT/cells/<name>.json.

  The parts that depend on the step times (W, the step reached within W, its score) are
  recomputed whenever OUT/step_times.json changed (delete it to re-measure); scores are cached
  per checkpoint, so that costs only the new ones.
  """
  record_path = os.path.join(args.out, "cells", cell["name"] + ".json")
  config, workdir = cell_config(cell, args), cell["workdir"]
  record = None
  if os.path.exists(record_path):
    with open(record_path) as f:
      record = json.load(f)
  if record is None:
    done = os.path.join(workdir, "train_done.json")
    if not os.path.exists(done):
      print(f"== train {cell['name']} ({config.num_train_steps} steps) -> {workdir}", flush=True)
      start = time.time()
      result = train(config, workdir)
      if result.get("preempted"):
        raise SystemExit("preempted (SIGTERM): rerun the same command to resume")
      _write_json(done, {"seconds_this_session": time.time() - start, "last_metrics": result})
    record = dict(study=cell["study"], variant=cell["variant"], seed=cell["seed"], steps=config.num_train_steps,
                  heldout=report.heldout_curve(workdir))
    if cell["study"] == "routers":
      print(f"== score {cell['name']}", flush=True)
      record["score_equal_steps"] = score(config, workdir, config.num_train_steps)
  sps = seconds_per_step[cell["variant"]]
  budget = config.num_train_steps * min(seconds_per_step[v] for v in args.variants)
  if record.get("seconds_per_step") != sps or (cell["study"] == "routers"
                                              and record.get("wall_clock_budget_seconds") != budget):
    record["seconds_per_step"] = sps
    if cell["study"] == "routers":
      reached = [s for s in report.checkpoint_steps(workdir) if s * sps <= budget + 1e-9]
      record["wall_clock_budget_seconds"] = budget
      record["step_at_budget"] = max(reached) if reached else None
      record["score_equal_wall_clock"] = score(config, workdir, max(reached)) if reached else None
    os.makedirs(os.path.dirname(record_path), exist_ok=True)
    _write_json(record_path, record)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="/work/runs32", help="results (outside the git tree)")
  parser.add_argument("--docs", default=str(REPO / "docs"), help="where the report goes after each cell")
  parser.add_argument("--steps", type=int, default=None, help="steps of the full budget (default: the tiny default's)")
  parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
  parser.add_argument("--variants", default="ec,dense,tc,ec_batch,tc_cap2")
  parser.add_argument("--with_dit_moe", action="store_true", help="add DiT-MoE's recipe, after everything else")
  parser.add_argument("--capacity", default=",".join(CAPACITY_VARIANTS), help="capacity-study variants ('' = none)")
  parser.add_argument("--heldout_every", type=int, default=250, help="held-out loss every this many steps")
  parser.add_argument("--checkpoints", type=int, default=20, help="checkpoints per run, all kept")
  parser.add_argument("--per_task", type=int, default=25, help="GenEval-style prompts per task (25: 77 prompts)")
  parser.add_argument("--images_per_prompt", type=int, default=4)
  parser.add_argument("--timing_rounds", type=int, default=5, help="interleaved rounds timing the train steps")
  parser.add_argument("--timing_steps", type=int, default=20, help="train steps per variant per timing round")
  parser.add_argument("--max_cells", type=int, default=0, help="only the first N cells of the order (0 = all)")
  parser.add_argument("--only", default="", help="comma-separated cell names (e.g. ec_batch_s0,tc_cap2_s0) to run "
                      "only those, e.g. in a second process beside the first; '' = all")
  parser.add_argument("--report_only", action="store_true", help="only rewrite the report from finished cells")
  parser.add_argument("--readme", default="", help="with --report_only: also rewrite this README's verdict table "
                      "(between <!-- router_verdicts:start --> and <!-- router_verdicts:end -->)")
  args = parser.parse_args(argv)
  args.seeds = [int(s) for s in args.seeds.split(",") if s]
  args.variants = [v for v in args.variants.split(",") if v] + (["dit_moe"] if args.with_dit_moe else [])
  args.capacity = [v for v in args.capacity.split(",") if v]
  args.only = [c for c in args.only.split(",") if c]
  if args.readme and not args.report_only:
    parser.error("--readme goes with --report_only (a study process never edits the README)")
  unknown = (set(args.variants) - set(ROUTER_VARIANTS)) | (set(args.capacity) - set(CAPACITY_VARIANTS))
  if unknown:
    parser.error(f"unknown variants {sorted(unknown)}; choose from {ROUTER_VARIANTS} and {tuple(CAPACITY_VARIANTS)}")
  return args


def main(argv=None):
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  if not args.report_only:
    selected = cells(args)
    unknown = set(args.only) - {c["name"] for c in selected}
    if unknown:
      raise SystemExit(f"--only: no cells {sorted(unknown)} in this study; its cells: {[c['name'] for c in selected]}")
    times = measure_step_times(args, args.variants, "step_times")
    if args.capacity:
      times.update(measure_step_times(args, args.capacity, "step_times_capacity"))
    for k, cell in enumerate(selected):
      if args.max_cells and k >= args.max_cells:
        break
      if args.only and cell["name"] not in args.only:
        continue
      start = time.time()
      run_cell(cell, args, times)
      report.write(args.out, args.docs)
      print(f"== cell {cell['name']} done ({time.time() - start:.0f} s this session)", flush=True)
  report.write(args.out, args.docs, args.readme if args.report_only else None)


if __name__ == "__main__":
  main()
