"""DiT-MoE-shaped token choice vs expert choice at matched activated compute, class-conditional, on CPU.

The network is DiT-MoE's (`configs/dit_moe.py`: SwiGLU experts, one shared SwiGLU expert of
width 2d, an MoE FFN in every block, balance loss 0.01 for token choice), shrunk to a toy
size: width 96, 4 blocks, 4 heads, 8 experts of width 4d, patch 2. The two runs differ only
in the router (`config.model.ffn.kind`):

  tc   token choice, top-2, dropless (DiT-MoE)
  ec   expert choice, capacity factor 2: each expert takes 2 x tokens / 8 tokens, so a
       token gets 2 routed experts on average, the same activated compute as top-2

Task: ShapesWorld single objects at 16x16 (a circle, square or triangle of one of 10 colours
on grey, random size and place); the class is shape x colour (30 classes). Pixels in
[-1, 1] are fed as the "latents" (in_channels=3, no VAE), trained with DiT-MoE's rectified
flow objective (`config.class_diffusion.objective = "rectified_flow"`), AdamW 1e-3 (10 warm-up steps), batch 32.
Both routers see the same seeds, the same initial weights (the routers' parameter shapes
are equal) and the same batches in the same order.

Measured: the training loss (MSE, without the auxiliary loss) every step, and a held-out
MSE every `--eval_every` steps on 128 fixed images with fixed t and noise (training-mode
routing). Each run's curves are written to OUT/runs/<kind>_s<seed>.json when it finishes (a run
whose file exists is skipped, so runs can go in parallel processes, e.g. one per `--kinds`);
then the figure and tables of all runs in OUT/runs: OUT/compare_routers_class_cond.{png,json,md}.

  python experiments/compare_routers_class_cond.py --out docs --steps 200 --seeds 0 --eval_every 25
  # or in two processes, then the figure:
  python experiments/compare_routers_class_cond.py --out OUT --steps 200 --seeds 0 --kinds tc &
  python experiments/compare_routers_class_cond.py --out OUT --steps 200 --seeds 0 --kinds ec; wait
  python experiments/compare_routers_class_cond.py --out OUT --kinds --steps 200   # only the figure
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ec_dit import sharding, tasks
from ec_dit.data import shapes_world  # noqa: E402
from ec_dit.training import optimizers, state as state_lib, step as step_lib  # noqa: E402
from configs import dit_moe as dit_moe_configs  # noqa: E402

SIZE, BATCH, NUM_EVAL = 16, 32, 128
KINDS = ("tc", "ec")


def make_config(kind: str, seed: int):
  """The toy DiT-MoE: 16x16x3 pixels, patch 2 (64 tokens), width 96, 4 blocks, 8 experts, 30 classes."""
  config = dit_moe_configs.get_config("S-8E2A" + ("-ec" if kind == "ec" else ""))
  m = config.model
  m.input_size, m.in_channels, m.patch_size = SIZE, 3, 2
  m.hidden_size, m.depth, m.num_heads = 96, 4, 4
  m.class_cond.num_classes, m.class_cond.learn_sigma = 30, False
  config.class_diffusion.objective, config.class_diffusion.sampler = "rectified_flow", "euler"
  config.class_diffusion.guidance_channels = 0
  config.batch_size, config.learning_rate, config.warmup_steps = BATCH, 1e-3, 10
  config.seed = seed
  config.mesh.expert = 1
  return config


def make_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """n single-object images in [-1, 1] [n, 16, 16, 3] and labels shape * 10 + colour, a function of (seed, i)."""
  images, labels = np.zeros((n, SIZE, SIZE, 3), np.float32), np.zeros((n,), np.int32)
  for i in range(n):
    rng = np.random.default_rng([seed, i])
    s, c = int(rng.integers(len(shapes_world.SHAPES))), int(rng.integers(len(shapes_world.COLOR_NAMES)))
    objs = shapes_world.place([(shapes_world.SHAPES[s], shapes_world.COLOR_NAMES[c])], SIZE, rng)
    images[i] = shapes_world.render(objs, SIZE).astype(np.float32) / 127.5 - 1.0
    labels[i] = s * len(shapes_world.COLOR_NAMES) + c
  return images, labels


def run(kind: str, seed: int, steps: int, eval_every: int, train_data, eval_data) -> dict:
  """Trains one router for `steps` steps; returns its curves."""
  config = make_config(kind, seed)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  tx = optimizers.make_optimizer(config)
  abstract = state_lib.abstract_state(config, tx, mesh)
  graphdef, task = abstract.graphdef, tasks.task_for(config)
  state, ema = state_lib.init_state(config, tx, abstract)
  train_step = step_lib.make_train_step(config, abstract, tx)

  @jax.jit
  def eval_mse(params, images, labels):
    _, aux = task.loss(config, nnx.merge(graphdef, params), {"image": images, "label": labels}, jax.random.key(1234))
    return aux["mse"]

  eval_images, eval_labels = (jnp.asarray(a) for a in eval_data)
  curve, evals, t0 = [], [], time.time()
  for step in range(1, steps + 1):
    rows = slice((step - 1) * BATCH, step * BATCH)
    batch = {"image": train_data[0][rows], "label": train_data[1][rows]}
    state, ema, metrics = train_step(state, ema, batch)
    curve.append(float(metrics["mse"]))
    if step % eval_every == 0 or step == steps:
      evals.append((step, float(eval_mse(state["params"], eval_images, eval_labels))))
      print(f"{kind} seed {seed} step {step}: train mse {np.mean(curve[-eval_every:]):.4f}, "
            f"held-out mse {evals[-1][1]:.4f} ({time.time() - t0:.0f}s)", flush=True)
  return {"kind": kind, "seed": seed, "train_mse": curve, "eval_mse": evals, "seconds": time.time() - t0,
          "last_aux_loss": float(metrics["aux_loss"])}


def smooth(x, k: int = 20) -> np.ndarray:
  x = np.asarray(x)
  return np.convolve(x, np.ones(k) / k, mode="valid")


def plot(results: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  colors = {"tc": "tab:blue", "ec": "tab:red"}
  labels = {"tc": "token choice top-2 (DiT-MoE)", "ec": "expert choice, capacity 2"}
  for r in results:
    style = "-" if r["seed"] == results[0]["seed"] else "--"
    y = smooth(r["train_mse"])
    axes[0].plot(np.arange(len(y)) + 20, y, style, color=colors[r["kind"]], label=f"{labels[r['kind']]}, seed {r['seed']}")
    s, v = zip(*r["eval_mse"])
    axes[1].plot(s, v, style + "o", color=colors[r["kind"]], ms=3, label=f"{labels[r['kind']]}, seed {r['seed']}")
  axes[0].set(title="training MSE (20-step moving mean)", xlabel="step", ylabel="MSE")
  axes[1].set(title="held-out MSE (128 images, fixed t and noise)", xlabel="step", ylabel="MSE")
  for ax in axes:
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=7)
  fig.suptitle("DiT-MoE-shaped toy (width 96, 4 blocks, 8 experts + shared), ShapesWorld shape x colour, 16x16 px")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def table(results: list[dict]) -> str:
  lines = ["| router | seed | train MSE, last 50 steps | held-out MSE at the end | seconds |",
           "| --- | --- | --- | --- | --- |"]
  for r in results:
    lines.append(f"| {r['kind']} | {r['seed']} | {np.mean(r['train_mse'][-50:]):.4f} | {r['eval_mse'][-1][1]:.4f} | "
                 f"{r['seconds']:.0f} |")
  for kind in KINDS:
    mine = [r for r in results if r["kind"] == kind]
    lines.append(f"| {kind} | mean | {np.mean([np.mean(r['train_mse'][-50:]) for r in mine]):.4f} | "
                 f"{np.mean([r['eval_mse'][-1][1] for r in mine]):.4f} | |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  parser.add_argument("--eval_every", type=int, default=25)
  parser.add_argument("--data_seed", type=int, default=0)
  parser.add_argument("--kinds", nargs="*", default=list(KINDS), choices=KINDS)
  args = parser.parse_args(argv)
  runs_dir = os.path.join(args.out, "runs")
  os.makedirs(runs_dir, exist_ok=True)
  todo = [(k, s) for s in args.seeds for k in args.kinds
          if not os.path.exists(os.path.join(runs_dir, f"{k}_s{s}.json"))]
  if todo:
    train_data = make_data(args.steps * BATCH, args.data_seed)
    eval_data = make_data(NUM_EVAL, args.data_seed + 1_000_000)
  for kind, seed in todo:
    r = run(kind, seed, args.steps, args.eval_every, train_data, eval_data)
    with open(os.path.join(runs_dir, f"{kind}_s{seed}.json"), "w") as f:
      json.dump(r, f)
  results = []
  for name in sorted(os.listdir(runs_dir)):
    with open(os.path.join(runs_dir, name)) as f:
      results.append(json.load(f))
  results = [r for r in results if len(r["train_mse"]) == args.steps]
  results.sort(key=lambda r: (r["seed"], KINDS.index(r["kind"])))
  if not results:
    return 0
  stem = os.path.join(args.out, "compare_routers_class_cond")
  plot(results, stem + ".png")
  with open(stem + ".json", "w") as f:
    json.dump(results, f)
  md = table(results)
  with open(stem + ".md", "w") as f:
    f.write(md + "\n")
  print(md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
