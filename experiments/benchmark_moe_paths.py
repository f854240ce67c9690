"""Old vs new MoE code paths, timed side by side in one process (issue 21).

What is measured
  Forward + backward (gradient of sum(y**2) w.r.t. every parameter and the
  input, which is also the router input) of one MoE layer, jitted:

    ec_s2      ExpertChoiceMoE, DiT-MoE-S/2 shape: width 384, 8 SwiGLU experts
               of hidden 1536 (no biases), capacity factor 2, batch 8 x 256 tokens,
               gather dispatch (ec_s2_einsum: the one-hot einsum dispatch)
    tc1_s2     TokenChoiceMoE top-2, capacity factor 1 (C = 64: the same expert
               slots, hence matmul FLOPs, as ec_s2)
    tc2_s2     TokenChoiceMoE top-2, capacity factor 2 (C = 128: twice ec_s2's slots)
    dense_s2   DenseMLP SwiGLU of hidden 2 x 1536 (the matmul FLOPs of ec_s2)
    ec_tiny    configs/ec_dit_tiny.py's layer: width 128, 8 GELU experts of
               hidden 512 with biases, batch 32 x 64 tokens

  each with the "old" code (the implementation before issue 21, kept below and
  patched in while tracing) and the "new" one (the library as it is), plus a
  2048x2048 float32 matmul for the rate. With `--model` also the whole
  DiT-MoE-S/2 training step (forward, backward, AdamW) for S-8E2A-ec and
  S-8E2A with token capacity factor 2, old and new.

How
  Everything is compiled first. Then `--rounds` rounds; in each, every (case,
  path) runs once, in an order rotated per round, so the load of this shared
  CPU hits all alike. Reported per case: median ms, the median over rounds of
  the paired ratio new / old, and `rate`: the expert matmuls' FLOP/s as a
  fraction of the 2048^2 matmul's in the same round (median); for the model
  steps the FLOPs are XLA's count of the compiled step (padded slots included).

Usage
  python -m experiments.benchmark_moe_paths                  # layers, ~3 minutes
  python -m experiments.benchmark_moe_paths --model --model_depth 4 --rounds 5

Output: one JSON line per case, starting with {"benchmark": "moe_paths".
This is a benchmark, not a test: it asserts only that old and new agree.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ec_dit import configs, primitives, sharding
from ec_dit.model import dit_moe
from ec_dit.moe import dispatch as dispatch_lib
from ec_dit.moe import layers
REPO = pathlib.Path(__file__).resolve().parents[1]
MATMUL_N = 2048


def old_experts_call(self, x_gecd):
  """`Experts.__call__` before issue 21: 4-D einsums over [E, G, C, .].

  Its weight gradients contract over (g, c) at once; XLA merges the two dims by
  a strided transpose of the hidden-width activation gradients.
  """
  x_gecd = sharding.constrain(x_gecd, ("expert_group", "expert", None, None))
  x_egcd = jnp.swapaxes(x_gecd.astype(self.dtype), 0, 1)
  h_egch = jnp.einsum("egcd,edh->egch", x_egcd, self._w(self.wi)) + self._b(self.bi, (slice(None), None, None))
  if self.wg is not None:
    h_egch = jax.nn.silu(jnp.einsum("egcd,edh->egch", x_egcd, self._w(self.wg))) * h_egch
  else:
    h_egch = primitives.gelu(h_egch)
  h_egch = sharding.constrain(h_egch, ("expert", "expert_group", None, "expert_mlp"))
  y_egcd = jnp.einsum("egch,ehd->egcd", h_egch, self._w(self.wo)) + self._b(self.bo, (slice(None), None, None))
  return sharding.constrain(jnp.swapaxes(y_egcd, 0, 1), ("expert_group", "expert", None, None))


def old_dispatch_einsum(x_gsd, slots, expert_fn):
  """`dispatch.dispatch_einsum` before issue 21: [G, E, C, S] one-hots, the combine contracting (e, c)."""
  token_indices = jnp.where(slots.valid, slots.token_indices, -1)
  dispatch_gecs = jax.nn.one_hot(token_indices, x_gsd.shape[1], dtype=x_gsd.dtype)
  x_gecd = jnp.einsum("gecs,gsd->gecd", dispatch_gecs, x_gsd)
  y_gecd = expert_fn(x_gecd).astype(x_gsd.dtype) * slots.gates[..., None].astype(x_gsd.dtype)
  return jnp.einsum("gecs,gecd->gsd", dispatch_gecs, y_gecd)


def old_dense_call(self, x, router_input=None):
  """`DenseMLP.__call__` before issue 21: Linear layers on [B, S, D]."""
  if self.activation == "swiglu":
    h = jax.nn.silu(self.wg(x)) * self.wi(x)
  else:
    h = primitives.gelu(self.wi(x))
  return self.wo(h), {}


def old_sparse_moe_call(self, x):
  """`dit_moe.SparseMoE.__call__` before issue 21: the shared expert on [B, S, D]."""
  y, diagnostics = self.routed(x, x)
  if self.shared is not None:
    y = y + self.shared(x)
  return y, diagnostics


OLD = {(layers.Experts, "__call__"): old_experts_call, (dispatch_lib, "dispatch_einsum"): old_dispatch_einsum,
       (layers.DenseMLP, "__call__"): old_dense_call, (dit_moe.SparseMoE, "__call__"): old_sparse_moe_call}


@contextlib.contextmanager
def code_path(path: str):
  """Within: the library traces with the old implementations ("old") or as it is ("new")."""
  saved = {key: getattr(*key) for key in OLD}
  try:
    if path == "old":
      for (owner, name), fn in OLD.items():
        setattr(owner, name, fn)
    yield
  finally:
    for (owner, name), fn in saved.items():
      setattr(owner, name, fn)


def layer_case(make, x):
  """(compile(path) -> zero-arg runner returning the loss, expert matmul FLOPs per call)."""
  model = make()
  graphdef, state = nnx.split(model)

  def loss(state, x):
    y, _ = nnx.merge(graphdef, state)(x, x)
    return jnp.sum(jnp.square(y.astype(jnp.float32)))

  def compile_path(path):
    with code_path(path):
      fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(state, x).compile()
    return lambda: jax.block_until_ready(fn(state, x))[0]
  return compile_path


def model_case(variant, capacity_factor, batch, depth):
  """DiT-MoE-S/2 training step (forward, backward, AdamW) of configs/dit_moe.py:`variant`, `depth` blocks."""
  config = load_dit_moe_config(variant)
  config.model.depth = depth
  config.model.ffn.token_capacity_factor = capacity_factor
  model = dit_moe.build(config)
  graphdef, params = nnx.split(model)
  tx = optax.adamw(1e-4)
  opt = tx.init(params)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, 32, 32, 4)), jnp.float32)
  t = jnp.asarray(rng.integers(0, 1000, batch), jnp.int32)
  labels = jnp.asarray(rng.integers(0, 1000, batch), jnp.int32)

  def step(params, opt):
    def loss_fn(p):
      out, aux = nnx.merge(graphdef, p)(x, t, labels)
      return jnp.mean(jnp.square(out)) + aux["aux_loss"]
    value, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return value, optax.apply_updates(params, updates), opt

  def compile_path(path):
    with code_path(path):
      fn = jax.jit(step).lower(params, opt).compile()
    run = lambda: jax.block_until_ready(fn(params, opt))[0]  # noqa: E731
    run.flops = xla_flops(fn)
    return run
  return compile_path


def xla_flops(compiled):
  """FLOPs XLA counts in a compiled step (padding included), or None."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return (cost or {}).get("flops")


def load_dit_moe_config(variant):
  """configs/dit_moe.py's `variant`."""
  return configs.load(f"{REPO / 'configs' / 'dit_moe.py'}:{variant}", validate=False)


def expert_flops(tokens, d, hidden, slots_per_token, swiglu):
  """Forward + backward FLOPs of the expert matmuls: 3x the forward's 2 * rows * d * hidden per matrix."""
  return 3 * 2 * tokens * slots_per_token * d * hidden * (3 if swiglu else 2)


def build_cases(args):
  """name -> (factory of compile_path, flops or None); a case builds its model only when selected."""
  b, s, d, h = 8, 256, 384, 1536
  x_s2 = jax.random.normal(jax.random.key(0), (b, s, d), jnp.float32)
  swiglu = dict(activation="swiglu", expert_bias=False, dispatch="gather", rngs=nnx.Rngs(0))
  einsum = dict(swiglu, dispatch="einsum")
  x_tiny = jax.random.normal(jax.random.key(1), (32, 64, 128), jnp.float32)
  cases = {
      "ec_s2": (lambda: layer_case(lambda: layers.ExpertChoiceMoE(d, num_experts=8, hidden=h, **swiglu), x_s2),
                expert_flops(b * s, d, h, 2, True)),
      "ec_s2_einsum": (lambda: layer_case(lambda: layers.ExpertChoiceMoE(d, num_experts=8, hidden=h, **einsum), x_s2),
                       expert_flops(b * s, d, h, 2, True)),
      "tc1_s2": (lambda: layer_case(lambda: layers.TokenChoiceMoE(d, num_experts=8, hidden=h, k=2, capacity_factor=1.0,
                                                          **swiglu), x_s2), expert_flops(b * s, d, h, 2, True)),
      "tc2_s2": (lambda: layer_case(lambda: layers.TokenChoiceMoE(d, num_experts=8, hidden=h, k=2, capacity_factor=2.0,
                                                          **swiglu), x_s2), expert_flops(b * s, d, h, 4, True)),
      "dense_s2": (lambda: layer_case(lambda: layers.DenseMLP(d, 2 * h, activation="swiglu", rngs=nnx.Rngs(0)), x_s2),
                   expert_flops(b * s, d, 2 * h, 1, True)),
      "ec_tiny": (lambda: layer_case(lambda: layers.ExpertChoiceMoE(128, num_experts=8, hidden=512, dispatch="gather",
                                                            rngs=nnx.Rngs(0)), x_tiny),
                  expert_flops(32 * 64, 128, 512, 2, False)),
  }
  if args.model:
    cases["model_ec_s2"] = (lambda: model_case("S-8E2A-ec", 0.0, args.model_batch, args.model_depth), None)
    cases["model_tc2_s2"] = (lambda: model_case("S-8E2A", 2.0, args.model_batch, args.model_depth), None)
  return cases


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rounds", type=int, default=7)
  p.add_argument("--model", action="store_true", help="also the whole DiT-MoE-S/2 training step")
  p.add_argument("--model_batch", type=int, default=8)
  p.add_argument("--model_depth", type=int, default=12, help="blocks (fewer: less memory, same per-block work)")
  p.add_argument("--cases", type=str, default="", help="comma list: only these cases")
  args = p.parse_args(argv)
  cases = build_cases(args)
  if args.cases:
    cases = {k: v for k, v in cases.items() if k in args.cases.split(",")}
  runners, flops = {}, {}
  for name, (factory, f) in cases.items():
    flops[name] = f
    compile_path = factory()
    for path in ("old", "new"):
      runners[(name, path)] = compile_path(path)
    old, new = runners[(name, "old")](), runners[(name, "new")]()  # also warms up
    if not np.isclose(float(old), float(new), rtol=1e-5):
      raise AssertionError(f"{name}: old loss {float(old)} != new {float(new)}")
  a = jnp.ones((MATMUL_N, MATMUL_N), jnp.float32)
  matmul = jax.jit(lambda a: a @ a).lower(a).compile()
  runners[("matmul", "-")] = lambda: jax.block_until_ready(matmul(a))
  runners[("matmul", "-")]()
  keys = list(runners)
  times = {key: [] for key in keys}
  for r in range(args.rounds):
    shift = r % len(keys)
    for key in keys[shift:] + keys[:shift]:
      t0 = time.perf_counter()
      runners[key]()
      times[key].append(time.perf_counter() - t0)
  mm = times[("matmul", "-")]
  for name in cases:
    told, tnew = times[(name, "old")], times[(name, "new")]
    row = {"benchmark": "moe_paths", "case": name, "rounds": args.rounds,
           "old_ms": round(1e3 * statistics.median(told), 1), "new_ms": round(1e3 * statistics.median(tnew), 1),
           "new_over_old": round(statistics.median([n / o for n, o in zip(tnew, told)]), 3)}
    for path, ts in (("old", told), ("new", tnew)):
      f = flops[name] or getattr(runners[(name, path)], "flops", None)
      if f:
        row[f"{path}_rate"] = round(statistics.median([(f / t) / (2 * MATMUL_N ** 3 / m) for t, m in zip(ts, mm)]), 3)
    print(json.dumps(row), flush=True)
  for a_name, b_name in (("tc1_s2", "ec_s2"), ("tc2_s2", "ec_s2"), ("model_tc2_s2", "model_ec_s2"),
                         ("ec_s2", "dense_s2")):
    if a_name in cases and b_name in cases:
      for path in ("old", "new"):
        ratio = statistics.median([x / y for x, y in zip(times[(a_name, path)], times[(b_name, path)])])
        print(json.dumps({"benchmark": "moe_paths", "ratio": f"{a_name}/{b_name}", "path": path,
                          "value": round(ratio, 3)}), flush=True)


if __name__ == "__main__":
  main()
