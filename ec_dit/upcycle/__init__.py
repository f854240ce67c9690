"""Sparse upcycling (Komatsuzaki et al. 2023): a dense model's FFNs become MoEs whose experts are copies of them.

    python -m ec_dit.upcycle RUN --out RUN2 --experts 8 --routing ec [--moe_every 2] [--optimizer_state reset]
    python -m ec_dit.convert pixart --checkpoint DIR --out RUN --upcycle_experts 8 --routing ec

Which layers: the MoE positions of the new `config.model.ffn` (`moe_every`,
`dense_first_n`): every other layer by default, as EC-DiT. Each chosen FFN (a
dense GELU MLP of width mlp_ratio * d: the text-to-image DiT's, PixArt-alpha's, or
DiT's with `class_cond.ffn_style = "dit"`) becomes E experts that each start as an
exact copy of it (weights and biases). The router starts as DiT-MoE's
`upcycle.py` does: N(0, 0.02) (`router_init="normal"`), or at zero (`"zeros"`:
uniform probabilities).

What the copy preserves at initialisation:
* token choice with renormalised top-k gates (`routing="tc"`, the default
  `renormalize_gates=True`): the gates of a token sum to one and every expert is
  the dense FFN, so the output is the dense model's (to float rounding);
* expert choice: each expert takes its top-C tokens, C = tokens x capacity_factor
  / E, by its router probability, and the output is sum over the experts that
  took a token of p_e(token) * FFN(token): a token no expert picks gets no FFN
  output at all, and the gates of a picked token sum to less than one (they are
  softmax probabilities over all E experts, of which only some picked it). The
  upcycled EC model therefore starts near, not at, the dense one.

Optimizer state: "reset" (a fresh optimizer at step 0, the default) or "carry"
(the step, and every moment copied exactly as its weight: experts get the dense
FFN's moments, the router zeros). The choice and the source are written into the
new run's `config.upcycled`. Runs are read and written by `ec_dit.upcycle.run`.
"""

from __future__ import annotations

import copy

import jax
import ml_collections
import numpy as np

from ec_dit import tasks

ROUTINGS = {"ec": "expert_choice", "tc": "token_choice"}
ROUTER_INITS = ("normal", "zeros")
OPTIMIZER_STATES = ("reset", "carry")
ROUTER_STD = 0.02  # DiT-MoE's upcycle.py: "rounting network initialize with norm (0, 0.02)"


def _is_moe_layer(index: int, f) -> bool:
  return index >= f.dense_first_n and (index + 1) % f.moe_every == 0


def _blocks_path(config) -> tuple[tuple, str]:
  """Where the per-block FFN parameters live: (path to the blocks dict, the FFN's key in a block)."""
  task = tasks.task_for(config)
  task.check_upcyclable(config)
  return task.ffn_blocks


def upcycled_config(config, *, num_experts: int, routing: str, moe_every: int = 2, dense_first_n: int = 0,
                    top_k: int = 2, capacity_factor: float = 2.0, renormalize_gates: bool = True,
                    router_init: str = "normal", optimizer_state: str = "reset", source: str = "",
                    source_step: int = -1) -> ml_collections.ConfigDict:
  """The config of the upcycled model; ValueError naming the option when the dense config cannot be upcycled."""
  if routing not in ROUTINGS:
    raise ValueError(f"routing must be one of {sorted(ROUTINGS)}, got {routing!r}")
  if router_init not in ROUTER_INITS:
    raise ValueError(f"router_init must be one of {ROUTER_INITS}, got {router_init!r}")
  if optimizer_state not in OPTIMIZER_STATES:
    raise ValueError(f"optimizer_state must be one of {OPTIMIZER_STATES}, got {optimizer_state!r}")
  old, m = config.model.ffn, config.model
  _blocks_path(config)
  if old.kind != "dense":
    raise ValueError(f"config.model.ffn.kind is {old.kind!r}: only a dense model can be upcycled")
  if old.activation != "gelu":
    raise ValueError(f"config.model.ffn.activation is {old.activation!r}: upcycling copies GELU MLPs")
  new = ml_collections.ConfigDict(copy.deepcopy(config.to_dict()))
  f = new.model.ffn
  f.kind, f.num_experts, f.moe_every, f.dense_first_n = ROUTINGS[routing], num_experts, moe_every, dense_first_n
  f.top_k, f.renormalize_gates, f.num_shared_experts, f.token_capacity_factor = top_k, renormalize_gates, 0, 0.0
  f.train_capacity_factor = f.eval_capacity_factor = capacity_factor
  u = new.upcycled
  u.source, u.source_step, u.num_experts, u.routing = source, int(source_step), num_experts, routing
  u.router_init, u.optimizer_state = router_init, optimizer_state
  tasks.validate(new)
  for i in range(m.depth):
    if _is_moe_layer(i, f) and _is_moe_layer(i, old) and old.dense_mlp_ratio != m.mlp_ratio:
      raise ValueError(f"layer {i}'s dense FFN has width {old.dense_mlp_ratio} x d but experts have mlp_ratio="
                       f"{m.mlp_ratio}: set config.model.ffn.dense_mlp_ratio = mlp_ratio in the dense run")
  return new


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def upcycle_tree(tree: dict, config, new_config, router) -> dict:
  """`tree` (parameters, or any tree shaped like them) with each chosen dense FFN replaced by E copies.

  `router(d, E)` gives the router kernel [d, E] (its init for parameters, zeros for moments).
  """
  path, key = _blocks_path(config)
  f, e = new_config.model.ffn, new_config.model.ffn.num_experts
  out = jax.tree.map(lambda a: a, tree)  # a new tree of the same leaves
  blocks = _get(out, path)
  for i in range(new_config.model.depth):
    if not _is_moe_layer(i, f):
      continue
    dense = blocks[i][key]
    tile = lambda a: np.repeat(np.asarray(a)[None], e, axis=0)  # noqa: E731
    kernel = np.asarray(dense["wi"]["kernel"])
    blocks[i][key] = {
        "router": {"proj": {"kernel": router(kernel.shape[0], e)}},
        "experts": {"wi": tile(dense["wi"]["kernel"]), "bi": tile(dense["wi"]["bias"]),
                    "wo": tile(dense["wo"]["kernel"]), "bo": tile(dense["wo"]["bias"])},
    }
  return out


def upcycle_params(params: dict, config, new_config, *, seed: int = 0) -> dict:
  """The upcycled parameters: experts copied, the router by `new_config.upcycled.router_init`."""
  rng = np.random.default_rng(seed)

  def router(d, e):
    if new_config.upcycled.router_init == "zeros":
      return np.zeros((d, e), np.float32)
    return (ROUTER_STD * rng.standard_normal((d, e))).astype(np.float32)

  return upcycle_tree(params, config, new_config, router)


def upcycle_opt_state(opt_state, params: dict, config, new_config):
  """Every params-shaped subtree of the optimizer state (Adam's moments, Muon's momentum) upcycled as the
  weights are, routers at zero; other leaves (counts) kept."""
  structure = jax.tree.structure(params)

  def is_params(x):
    return isinstance(x, dict) and jax.tree.structure(x) == structure

  zeros = lambda d, e: np.zeros((d, e), np.float32)  # noqa: E731
  return jax.tree.map(lambda x: upcycle_tree(x, config, new_config, zeros) if is_params(x) else x, opt_state,
                      is_leaf=is_params)


def add_arguments(parser, *, experts_flag: str) -> None:
  """The upcycling options (shared by this CLI and the converters')."""
  parser.add_argument(experts_flag, type=int, default=0, help="experts per MoE layer (0 = no upcycling)")
  parser.add_argument("--routing", default="ec", choices=sorted(ROUTINGS), help="expert choice or token choice")
  parser.add_argument("--moe_every", type=int, default=2, help="an MoE every N layers (EC-DiT: 2)")
  parser.add_argument("--dense_first_n", type=int, default=0, help="keep the first N layers dense")
  parser.add_argument("--top_k", type=int, default=2, help="token choice: experts per token")
  parser.add_argument("--capacity_factor", type=float, default=2.0, help="expert choice: capacity factor")
  parser.add_argument("--router_init", default="normal", choices=ROUTER_INITS, help="N(0, 0.02) or zeros")
  parser.add_argument("--optimizer_state", default="reset", choices=OPTIMIZER_STATES,
                      help="fresh optimizer at step 0, or carry the step and moments over")
  parser.add_argument("--seed", type=int, default=0, help="router initialisation seed")


def options(args, experts_attr: str) -> dict:
  """The keyword arguments of `upcycled_config` (plus seed) from parsed `add_arguments` options."""
  return dict(num_experts=getattr(args, experts_attr), routing=args.routing, moe_every=args.moe_every,
              dense_first_n=args.dense_first_n, top_k=args.top_k, capacity_factor=args.capacity_factor,
              router_init=args.router_init, optimizer_state=args.optimizer_state, seed=args.seed)
