"""Recipe sweep for the embedded default: train short runs, score each on ShapesWorld GenEval.

Each variant is the tiny config (`configs/ec_dit_tiny.py`) with a few fields
changed, trained for `--steps` steps and scored with `--images` images per prompt
of the ShapesWorld GenEval-style set. Runs go one after another (two CPU cores
cannot run two fairly), each in its own process so compile caches and memory
start clean. This is how the tiny recipe was chosen; the README quotes its table.

Usage
  python experiments/sweep_tiny_recipe.py --workdir=/tmp/sweep              # the README's sweep
  python experiments/sweep_tiny_recipe.py --workdir=/tmp/sweep --steps=500 \\
      --variant 'lr3e-3=learning_rate=3e-3' --variant 'b64=batch_size=64'

A variant is `NAME=FIELD=VALUE[,FIELD=VALUE...]` with config fields as on the
command line (`model.depth=4`). Output: a table, then one JSON line per variant
starting with {"benchmark": "sweep_tiny_recipe".
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

# The sweeps behind the tiny recipe. Each variant spells out prediction and loss_t_min,
# so the table stays reproducible as the defaults move (x0 since the first sweep,
# loss_t_min=0.3 since the second).
_X0 = "model.prediction=x0,diffusion.loss_t_min=0"
DEFAULT_VARIANTS = (
    "velocity=model.prediction=velocity,diffusion.loss_t_min=0",
    f"x0={_X0}",
    f"x0_lr2e-3={_X0},learning_rate=2e-3",
    f"x0_ema0.99={_X0},ema_decay=0.99",
    f"x0_tmean+0.5={_X0},diffusion.t_mean=0.5",
    f"x0_tmean-0.5={_X0},diffusion.t_mean=-0.5",
    f"x0_batch16={_X0},batch_size=16,num_train_steps=3000",
    f"x0_depth4={_X0},model.depth=4,num_train_steps=2130",
    f"x0_long_skips={_X0},model.long_skips=True",
    f"x0_swiglu={_X0},model.ffn.activation=swiglu",
    f"x0_patch8={_X0},model.patch_size=8,model.hidden_size=256,model.context_dim=256",
    "x0_ltmin0.2=model.prediction=x0,diffusion.loss_t_min=0.2",
    "x0_ltmin0.3=model.prediction=x0,diffusion.loss_t_min=0.3",
    "x0_ltmin1=model.prediction=x0,diffusion.loss_t_min=1.0",
    "x0_ltmin0.3_batch64=model.prediction=x0,diffusion.loss_t_min=0.3,batch_size=64,num_train_steps=750",
)
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def parse_variant(spec: str) -> tuple[str, list[str]]:
  name, _, fields = spec.partition("=")
  if not name or not fields:
    raise SystemExit(f"--variant must be NAME=FIELD=VALUE[,FIELD=VALUE...], got {spec!r}")
  flags = []
  for item in fields.split(","):
    key, sep, value = item.partition("=")
    if not sep:
      raise SystemExit(f"--variant {name}: {item!r} is not FIELD=VALUE")
    flags.append(f"--config.{key}={value}")
  return name, flags


def run(name: str, flags: list[str], args) -> dict:
  workdir = os.path.join(args.workdir, name)
  if os.path.exists(workdir):  # a run there would resume, not start fresh; never delete it
    raise SystemExit(f"{workdir} exists: pass a new --workdir or remove it")
  os.makedirs(workdir)
  log_path = workdir + ".log"  # both processes' output, for when a run fails
  steps = next((int(f.split("=", 1)[1]) for f in flags if f.startswith("--config.num_train_steps=")), args.steps)
  common = [sys.executable, "-m", "ec_dit.main", f"--config={REPO / 'configs' / 'ec_dit_tiny.py'}",
            f"--workdir={workdir}"]

  def call(extra):
    with open(log_path, "a") as log:
      if subprocess.run(common + extra, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode:
        raise SystemExit(f"variant {name} failed; see {log_path}")

  t0 = time.time()
  # The variant's own fields come last, so they win (e.g. its own num_train_steps).
  call(["--mode=train", f"--config.num_train_steps={steps}", f"--config.checkpoint_every_steps={steps}",
        f"--config.eval_every_steps={10 * steps}", *flags])
  t1 = time.time()
  call(["--mode=evaluate", f"--config.geneval.images_per_prompt={args.images}", *flags])
  with open(os.path.join(workdir, "geneval", "summary.json")) as f:
    scores = json.load(f)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    losses = [json.loads(line)["loss"] for line in f]
  tail = losses[-5:]
  return {"benchmark": "sweep_tiny_recipe", "variant": name, "overrides": flags, "steps": steps,
          "images_per_prompt": args.images, "train_seconds": round(t1 - t0, 1),
          "final_loss": round(sum(tail) / len(tail), 4), **{k: scores[k] for k in ("overall", *TASKS)}}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="one run directory per variant is made here")
  parser.add_argument("--steps", type=int, default=1500)
  parser.add_argument("--images", type=int, default=2, help="images per prompt when scoring")
  parser.add_argument("--variant", action="append", help="NAME=FIELD=VALUE[,FIELD=VALUE...] (repeatable)")
  args = parser.parse_args()
  variants = [parse_variant(v) for v in (args.variant or DEFAULT_VARIANTS)]
  results = []
  for name, flags in variants:
    print(f"[{len(results) + 1}/{len(variants)}] {name}: {' '.join(flags)}", flush=True)
    results.append(run(name, flags, args))
  print(f"\n{'variant':<20} {'overall':>8} " + " ".join(f"{t[:8]:>8}" for t in TASKS) + f" {'loss':>7}")
  for r in results:
    print(f"{r['variant']:<20} {r['overall']:>8.1%} " + " ".join(f"{r[t]:>8.1%}" for t in TASKS)
          + f" {r['final_loss']:>7.4f}")
  for r in results:
    print(json.dumps(r))


if __name__ == "__main__":
  main()
