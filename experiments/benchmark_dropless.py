"""Speed of dropless token choice: ragged_dot against the tiled grouped matmuls, and capacity-2 token choice.

What is measured
  One jitted training step of a single routed MoE layer (TokenChoiceMoE, top-k,
  SwiGLU experts without biases as DiT-MoE, no shared expert: it costs the same
  in every variant): forward, then the gradient of sum(y**2) w.r.t. every
  parameter and the input x (also the router input). Layers, all with the same
  parameters (same seed):

    ragged_dot   dropless, `lax.ragged_dot` (on CPU: every expert on every row)
    tiles        dropless, `ec_dit.moe.grouped` tiles at the automatic tile sizes
    tiles_tN     the same with tiles of N rows only; tiles_tN-M: of M, M/2, ..., N rows (with --tiles)
    cf2          token choice with capacity factor 2, gather dispatch (drops overflow)
    ec_cf2       expert choice with capacity factor 2, gather dispatch (for reference)

How
  Every step is compiled and run once (excluded), then `--repeats` rounds run
  every layer once each, in a rotated order, in this one process, so load from
  other jobs on the machine hits all alike. Reported: the median time per
  layer, and per layer the median over rounds of the paired ratio to
  ragged_dot and to cf2 (same round).

Shapes
  s2    DiT-MoE-S/2-8E2A at batch 8: d=384, expert hidden 1536, E=8, top-2,
        256 tokens per image (32x32x4 latents, patch 2): N = 8*256*2 = 4096 rows
  tiny  the tests' tiny DiT-MoE at batch 8: d=64, hidden 128, E=4, 16 tokens: N = 256

Usage
  python -m experiments.benchmark_dropless --shape s2 --repeats 7      # from the repository root
  python -m experiments.benchmark_dropless --shape tiny --repeats 21 --tiles 16,32,64
  python -m experiments.benchmark_dropless --shape s2 --skip ragged_dot --tiles 128,64-256,64-512

Output: one JSON line per shape starting with {"benchmark": "dropless".
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from ec_dit.moe import grouped
from ec_dit.moe.layers import ExpertChoiceMoE, TokenChoiceMoE

# shape -> (d, expert hidden, experts, top-k, tokens per image, batch)
SHAPES = {"s2": (384, 1536, 8, 2, 256, 8), "tiny": (64, 128, 4, 2, 16, 8)}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shape", default="s2", help=f"comma list of {sorted(SHAPES)}")
  p.add_argument("--repeats", type=int, default=7, help="timed rounds")
  p.add_argument("--tiles", default="", help="comma list of forced tile sizes N or N-M (M down to N) to time as well")
  p.add_argument("--batch", type=int, default=0, help="images per step (0: the shape's)")
  p.add_argument("--skip", default="", help="comma list of layers not to time (e.g. ragged_dot, slow on CPU)")
  return p.parse_args(argv)


def make_step(model: nnx.Module, x: jax.Array, tiles: tuple = ()):
  """Compiled value_and_grad of sum(y**2) w.r.t. (params, x), with the tile sizes forced while tracing."""
  graphdef, state = nnx.split(model)

  def loss(state, x):
    y, _ = nnx.merge(graphdef, state)(x, x)
    return jnp.sum(jnp.square(y.astype(jnp.float32)))

  automatic = grouped.tile_sizes
  if tiles:
    grouped.tile_sizes = lambda n, e: tiles
  try:
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(state, x).compile()
  finally:
    grouped.tile_sizes = automatic
  return lambda: compiled(state, x)


def layers_for(shape: str, tiles):
  d, hidden, e, k, _, _ = SHAPES[shape]
  common = dict(num_experts=e, hidden=hidden, activation="swiglu", expert_bias=False, dispatch="gather")
  tc = lambda **kw: TokenChoiceMoE(d, k=k, rngs=nnx.Rngs(0), **common, **kw)  # noqa: E731
  out = {"ragged_dot": (tc(dropless_impl="ragged_dot"), ()), "tiles": (tc(dropless_impl="tiles"), ())}
  for spec in tiles:
    small, big = (int(v) for v in (spec.split("-") + [spec])[:2])
    out[f"tiles_t{spec}"] = (tc(dropless_impl="tiles"), grouped.halvings(big, small))
  out["cf2"] = (tc(capacity_factor=2.0), ())
  out["ec_cf2"] = (ExpertChoiceMoE(d, train_capacity_factor=2.0, rngs=nnx.Rngs(0), **common), ())
  return out


def time_shape(shape: str, args) -> dict:
  d, hidden, e, k, s, b = SHAPES[shape]
  b = args.batch or b
  tiles = [t for t in args.tiles.split(",") if t]
  x = jax.random.normal(jax.random.key(0), (b, s, d), jnp.float32)
  steps, losses = {}, {}
  skip = set(args.skip.split(","))
  for name, (layer, tile) in layers_for(shape, tiles).items():
    if name in skip:
      continue
    steps[name] = make_step(layer, x, tile)
    losses[name] = float(jax.block_until_ready(steps[name]())[0])
  for name in steps:
    if name.startswith("tiles") and "ragged_dot" in losses and abs(losses[name] - losses["ragged_dot"]) > 1e-4 * abs(losses["ragged_dot"]):
      raise AssertionError(f"{name} disagrees with ragged_dot: {losses}")
  names = list(steps)
  times = {name: [] for name in names}
  for r in range(args.repeats):
    for name in names[r % len(names):] + names[:r % len(names)]:
      t0 = time.perf_counter()
      jax.block_until_ready(steps[name]())
      times[name].append(time.perf_counter() - t0)
  n = b * s * k
  out = {"benchmark": "dropless", "shape": shape, "backend": jax.default_backend(), "d": d, "hidden": hidden,
         "experts": e, "k": k, "rows": n, "auto_tiles": grouped.tile_sizes(n, e), "repeats": args.repeats,
         "ms": {name: round(1e3 * statistics.median(times[name]), 2) for name in names}}
  for ref in [r for r in ("ragged_dot", "cf2") if r in times]:
    out[f"ratio_to_{ref}"] = {name: round(statistics.median([t / u for t, u in zip(times[name], times[ref])]), 3)
                              for name in names}
  return out


def main(argv=None):
  args = parse_args(argv)
  print(f"jax {jax.__version__} on {jax.default_backend()}", flush=True)
  for shape in args.shape.split(","):
    print(json.dumps(time_shape(shape, args)), flush=True)


if __name__ == "__main__":
  main()
