"""Speed of the expert-choice MoE layer against a dense MLP with the same FLOPs.

What is measured
  One jitted training step of a single layer: forward, then the gradient of
  sum(y**2) with respect to every parameter and to the input x (the input is
  also the router input, so the router's gradient path is included). Three
  layers are timed at every point:

    dense   DenseMLP(d, hidden=capacity_factor * 4d)
    einsum  ExpertChoiceMoE(d, E experts of hidden 4d, dispatch="einsum")
    gather  ExpertChoiceMoE(d, E experts of hidden 4d, dispatch="gather")

  With C = round(S * cf / E) slots per expert and group, the experts process
  E * C = cf * S token-slots of width 4d per image, the same matmul FLOPs as a
  dense MLP of width cf * 4d on S tokens ("matched dense"). Everything the MoE
  does beyond that (router, top-k, dispatch and combine, their gradients) is
  overhead, and the ratio MoE time / dense time measures it. Routing groups are
  per image (G = B, S tokens per group), as in the model.

How
  Points: S in {256, 1024, 4096} x E in {8, 32}. The batch is B = tokens / S
  (default 4096 tokens per step), so every point does the same dense work.
  Each point compiles the three steps, runs each once as warm-up (excluded),
  then runs `--repeats` rounds; in each round every layer runs once, in a
  rotated order, so machine noise (this CPU is shared) hits all three alike.
  Reported: median time per layer, and the median over rounds of the paired
  ratio MoE / dense (same round), which is robust to slow drifts in load.
  `best` is the faster dispatch; the target is best ratio <= 1.15 everywhere.

Usage
  python experiments/benchmark_moe.py                 # full run, a few minutes
  python experiments/benchmark_moe.py --quick         # S in {256, 1024}, fewer repeats
  python experiments/benchmark_moe.py --d 384 --repeats 9 --batch 2

Output: a table, then one JSON line starting with {"benchmark": "moe_layer".
This is a benchmark, not a test: it asserts nothing about speed (only that the
two dispatches compute the same loss).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm import tqdm

from ec_dit.moe import routing
from ec_dit.moe.layers import DenseMLP, ExpertChoiceMoE

TARGET_RATIO = 1.15
LAYERS = ("dense", "einsum", "gather")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="S in {256, 1024}, 3 repeats: a smoke run")
  p.add_argument("--d", type=int, default=256, help="model width")
  p.add_argument("--batch", type=int, default=0,
                 help="images per step at every point (0: tokens // S)")
  p.add_argument("--tokens", type=int, default=4096, help="tokens per step when --batch is 0")
  p.add_argument("--repeats", type=int, default=0, help="timed rounds per point (0: 7, or 3 with --quick)")
  p.add_argument("--capacity_factor", type=float, default=2.0)
  p.add_argument("--seq_lens", type=str, default="", help="comma list overriding S")
  p.add_argument("--experts", type=str, default="8,32", help="comma list of E")
  args = p.parse_args(argv)
  if not args.seq_lens:
    args.seq_lens = "256,1024" if args.quick else "256,1024,4096"
  if not args.repeats:
    args.repeats = 3 if args.quick else 7
  return args


def make_step(model: nnx.Module):
  """jit(value_and_grad) of sum(y**2) w.r.t. (params, x); returns step(x) and its params."""
  graphdef, state = nnx.split(model)

  def loss(state, x):
    y, _ = nnx.merge(graphdef, state)(x, x)
    return jnp.sum(jnp.square(y.astype(jnp.float32)))

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  return step, state


def time_point(s: int, e: int, args) -> dict:
  d, cf = args.d, args.capacity_factor
  b = args.batch or max(1, args.tokens // s)
  x = jax.random.normal(jax.random.key(0), (b, s, d), jnp.float32)
  models = {
      "dense": DenseMLP(d, int(cf * 4 * d), rngs=nnx.Rngs(0)),
      # Same seed, same module structure: both MoEs hold identical parameters.
      "einsum": ExpertChoiceMoE(d, num_experts=e, hidden=4 * d, train_capacity_factor=cf,
                                dispatch="einsum", rngs=nnx.Rngs(0)),
      "gather": ExpertChoiceMoE(d, num_experts=e, hidden=4 * d, train_capacity_factor=cf,
                                dispatch="gather", rngs=nnx.Rngs(0)),
  }
  steps = {name: make_step(m) for name, m in models.items()}
  # Compile and warm up (excluded from timing).
  losses = {}
  for name, (step, state) in steps.items():
    value, _ = jax.block_until_ready(step(state, x))
    losses[name] = float(value)
  if abs(losses["einsum"] - losses["gather"]) > 1e-4 * max(1.0, abs(losses["gather"])):
    raise AssertionError(f"dispatches disagree at S={s} E={e}: {losses}")

  times = {name: [] for name in LAYERS}
  for r in range(args.repeats):
    order = LAYERS[r % 3:] + LAYERS[:r % 3]  # rotate so no layer always runs first
    for name in order:
      step, state = steps[name]
      t0 = time.perf_counter()
      jax.block_until_ready(step(state, x))
      times[name].append(time.perf_counter() - t0)

  point = {"S": s, "E": e, "B": b, "C": routing.capacity(s, cf, e)}
  for name in LAYERS:
    point[f"{name}_ms"] = round(1e3 * statistics.median(times[name]), 2)
  for name in ("einsum", "gather"):
    paired = [t / td for t, td in zip(times[name], times["dense"])]
    point[f"{name}_ratio"] = round(statistics.median(paired), 3)
  point["best"] = min(("einsum", "gather"), key=lambda n: point[f"{n}_ratio"])
  point["best_ratio"] = point[f"{point['best']}_ratio"]
  return point


def main(argv=None):
  args = parse_args(argv)
  seq_lens = [int(v) for v in args.seq_lens.split(",")]
  experts = [int(v) for v in args.experts.split(",")]
  grid = [(s, e) for s in seq_lens for e in experts]
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; d={args.d}, "
        f"capacity_factor={args.capacity_factor}, dense hidden={int(args.capacity_factor * 4 * args.d)}, "
        f"expert hidden={4 * args.d}, repeats={args.repeats}", flush=True)
  points = [time_point(s, e, args) for s, e in tqdm(grid, desc="points", unit="pt")]

  header = (f"{'S':>5} {'E':>3} {'B':>3} {'C':>5} {'dense ms':>9} {'einsum ms':>10} {'gather ms':>10} "
            f"{'einsum/dense':>13} {'gather/dense':>13}  best")
  print(header)
  print("-" * len(header))
  for p in points:
    print(f"{p['S']:>5} {p['E']:>3} {p['B']:>3} {p['C']:>5} {p['dense_ms']:>9.1f} {p['einsum_ms']:>10.1f} "
          f"{p['gather_ms']:>10.1f} {p['einsum_ratio']:>13.3f} {p['gather_ratio']:>13.3f}  {p['best']}")
  max_best = max(p["best_ratio"] for p in points)
  print(f"max best ratio {max_best:.3f} (target <= {TARGET_RATIO})")
  print(json.dumps({
      "benchmark": "moe_layer", "d": args.d, "capacity_factor": args.capacity_factor,
      "repeats": args.repeats, "points": points, "max_best_ratio": max_best,
      "target": TARGET_RATIO, "meets_target": max_best <= TARGET_RATIO,
  }))


if __name__ == "__main__":
  main()
