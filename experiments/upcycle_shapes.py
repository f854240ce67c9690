"""Sparse upcycling in miniature: does a dense model upcycled to expert choice beat continued dense training?

On tiny ShapesWorld (configs/ec_dit_tiny.py: 6 layers, width 128), per seed s, at matched total steps N + M:

  (a) dense   dense (FFN 4d in every layer) for N steps, then dense for M more
  (b) upcycle dense for N steps (the same run as (a)'s first phase), then upcycled to expert choice
              (8 experts, capacity 2, every other layer, experts copies of the dense FFN, router N(0, 0.02))
              for M more
  (c) ec      expert choice from scratch for N + M steps

Both second phases start from the dense step-N checkpoint (parameters and EMA) with a fresh optimizer
and learning-rate schedule (`optimizer_state="reset"`) and read the same data stream (data seed
s + 1000); (c) and the first phase read data seed s. Reported per arm (mean and each seed):

  * the held-out loss: the velocity MSE of the EMA weights on 8 fixed batches of ShapesWorld data seed
    99 (never trained on), with fixed timesteps, noise and text dropout;
  * the GenEval-style ShapesWorld score of the final EMA weights (the library's `--mode=evaluate`).

Writes OUT/upcycle_shapes.json, OUT/upcycle_shapes.md (table) and OUT/upcycle_shapes.png (held-out loss
against total steps). Resumable: every run resumes from its checkpoints and every score is cached.

  python experiments/upcycle_shapes.py --out runs/upcycle_shapes --n 1000 --m 1000 --seeds 0 1    # the study
  python experiments/upcycle_shapes.py --out /tmp/us --n 4 --m 4 --seeds 0 --per_task 1 --images_per_prompt 1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib

import jax
import numpy as np
from flax import nnx
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ec_dit import checkpoint, data, diffusion, tokenizer as tokenizer_lib
from ec_dit.convert import dit_moe as run_writer
from ec_dit.geneval.generate import evaluate_run
from ec_dit.inference import load_run_config
from ec_dit.model import text_to_image
from ec_dit.training.loop import train
from ec_dit.upcycle import run as upcycle_run

REPO = pathlib.Path(__file__).resolve().parents[1]
ARMS = ("dense", "upcycle", "ec")
HELD_OUT_SEED, HELD_OUT_BATCHES = 99, 8


def tiny(args, seed: int, *, kind: str, steps: int, data_seed: int):
  spec = importlib.util.spec_from_file_location("ec_dit_tiny", REPO / "configs" / "ec_dit_tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(None)
  f = config.model.ffn
  if kind == "dense":  # 4d everywhere: the width the experts copy
    f.kind, f.dense_mlp_ratio = "dense", config.model.mlp_ratio
  config.num_train_steps, config.seed, config.input.data_seed = steps, seed, data_seed
  config.warmup_steps = min(config.warmup_steps, max(1, steps // 10))
  config.log_every_steps = max(1, min(50, steps // 10))
  config.checkpoint_every_steps = max(1, steps // 4)
  config.keep_checkpoints = 6  # every checkpoint: the held-out curve reads them all
  config.eval_every_steps = 0
  config.geneval.per_task, config.geneval.images_per_prompt = args.per_task, args.images_per_prompt
  return config


def train_once(config, workdir: str) -> None:
  """Trains (or resumes) to config.num_train_steps; stops the script if the run stopped early (e.g. SIGTERM)."""
  if os.path.exists(os.path.join(workdir, "train_done.json")):
    return
  train(config, workdir)
  if max(checkpoint.saved_steps(workdir), default=0) < config.num_train_steps:
    raise SystemExit(f"{workdir} stopped before step {config.num_train_steps}: rerun the command to resume")
  with open(os.path.join(workdir, "train_done.json"), "w") as f:
    json.dump({"steps": config.num_train_steps}, f)


def second_phase(args, seed: int, arm: str, dense_run: str, workdir: str):
  """(a) or (b): a new run from the dense step-N checkpoint, trained for M steps."""
  config = tiny(args, seed, kind="dense", steps=args.n, data_seed=seed)
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    _, params, _, ema = upcycle_run.restore_state(config, dense_run)
    if arm == "dense":
      run_writer.write_run(config, params, workdir, ema=ema)
    else:
      upcycle_run.write_upcycled(config, params, workdir, ema=ema, num_experts=8, routing="ec", seed=seed,
                                 source=dense_run, step=args.n)
  phase2 = load_run_config(workdir)
  phase2.num_train_steps, phase2.input.data_seed = args.m, seed + 1000
  phase2.warmup_steps = min(phase2.warmup_steps, max(1, args.m // 10))
  phase2.log_every_steps, phase2.checkpoint_every_steps = max(1, min(50, args.m // 10)), max(1, args.m // 4)
  phase2.keep_checkpoints = 6
  train_once(phase2, workdir)
  return phase2


def held_out_loss(config, workdir: str, step: int | None = None) -> float:
  """Velocity MSE of the EMA weights on fixed held-out batches (fixed t, noise and text dropout)."""
  model = text_to_image.abstract_model(config)
  nnx.update(model, checkpoint.restore_ema(workdir, text_to_image.abstract_params(config), step=step))
  model.eval()
  held = config.input.copy_and_resolve_references()
  held.data_seed = HELD_OUT_SEED
  tokenize = tokenizer_lib.tokenizer_from_config(config).encode
  batches = iter(data.create_dataset(held, batch_size=config.batch_size, tokenize=tokenize, seed=HELD_OUT_SEED,
                                     context_len=config.model.context_len))
  d = config.diffusion
  losses = []
  for i in range(HELD_OUT_BATCHES):
    b = next(batches)
    _, aux = diffusion.rectified_flow_loss(model, b["image"], b["tokens"], b["mask"], jax.random.key(i),
                                           t_mean=d.t_mean, t_std=d.t_std, uncond_prob=d.uncond_prob,
                                           loss_t_min=d.loss_t_min)
    losses.append(float(aux["mse"]))
  return float(np.mean(losses))


def cached(path: str, fn):
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  value = fn()
  with open(path, "w") as f:
    json.dump(value, f)
  return value


def run_seed(args, seed: int) -> dict:
  root = os.path.join(args.out, "runs")
  dense_run = os.path.join(root, f"dense_n_s{seed}")
  train_once(tiny(args, seed, kind="dense", steps=args.n, data_seed=seed), dense_run)
  configs = {arm: second_phase(args, seed, arm, dense_run, os.path.join(root, f"{arm}_m_s{seed}"))
             for arm in ("dense", "upcycle")}
  ec_run = os.path.join(root, f"ec_s{seed}")
  configs["ec"] = tiny(args, seed, kind="ec", steps=args.n + args.m, data_seed=seed)
  train_once(configs["ec"], ec_run)
  workdirs = {"dense": os.path.join(root, f"dense_m_s{seed}"), "upcycle": os.path.join(root, f"upcycle_m_s{seed}"),
              "ec": ec_run}
  out = {}
  for arm in ARMS:
    w, c = workdirs[arm], configs[arm]
    curve = [(args.n + s if arm != "ec" else s, held_out_loss(c, w, s)) for s in checkpoint.saved_steps(w)]
    if arm != "ec":  # the shared first phase
      curve = [(s, held_out_loss(configs["dense"], dense_run, s)) for s in checkpoint.saved_steps(dense_run)] + curve
    score = cached(os.path.join(w, "score.json"), lambda: evaluate_run(c, w)["overall"])
    out[arm] = {"curve": cached(os.path.join(w, "held_out_curve.json"), lambda: curve), "score": score}
  return out


def report(args, results: dict) -> str:
  lines = [f"N = {args.n}, M = {args.m} steps; seeds {args.seeds}; GenEval-style score with {args.per_task} "
           f"prompts per task x {args.images_per_prompt} images", "",
           "| arm | held-out loss at N+M (mean) | per seed | GenEval-style overall (mean) | per seed |",
           "|---|---|---|---|---|"]
  for arm in ARMS:
    losses = [results[s][arm]["curve"][-1][1] for s in args.seeds]
    scores = [results[s][arm]["score"] for s in args.seeds]
    lines.append(f"| {arm} | {np.mean(losses):.4f} | {', '.join(f'{x:.4f}' for x in losses)} | "
                 f"{100 * np.mean(scores):.1f}% | {', '.join(f'{100 * x:.1f}%' for x in scores)} |")
  fig = Figure(figsize=(6, 4))
  ax = fig.add_subplot()
  for arm in ARMS:
    for s in args.seeds:
      steps, losses = zip(*results[s][arm]["curve"])
      ax.plot(steps, losses, label=f"{arm} s{s}", color={"dense": "C0", "upcycle": "C1", "ec": "C2"}[arm])
  ax.axvline(args.n, color="grey", lw=0.5)
  ax.set_xlabel("total training steps")
  ax.set_ylabel("held-out velocity MSE (EMA)")
  ax.legend(fontsize=7)
  FigureCanvasAgg(fig).print_png(os.path.join(args.out, "upcycle_shapes.png"))
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--n", type=int, default=1000, help="dense steps before upcycling")
  parser.add_argument("--m", type=int, default=1000, help="steps after it")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  parser.add_argument("--per_task", type=int, default=20)
  parser.add_argument("--images_per_prompt", type=int, default=2)
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  results = {s: run_seed(args, s) for s in args.seeds}
  table = report(args, results)
  with open(os.path.join(args.out, "upcycle_shapes.json"), "w") as f:
    json.dump({"args": vars(args), "results": {str(s): r for s, r in results.items()}}, f, indent=2)
  with open(os.path.join(args.out, "upcycle_shapes.md"), "w") as f:
    f.write(table + "\n")
  print(table)


if __name__ == "__main__":
  main()
