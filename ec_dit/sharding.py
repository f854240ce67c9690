"""Device mesh and logical-to-mesh sharding rules (config.mesh).

The mesh has four named axes, sized by the config (-1 = the rest of the devices):

  data    pure data parallelism: params replicated, batch split
  fsdp    data parallelism with parameters (and optimizer state) split over `embed`
          (ZeRO-3 style; XLA all-gathers each weight where it is used)
  expert  expert parallelism: experts split over it; between MoE layers it also
          splits the batch, so dispatch and combine become all-to-alls
  tensor  tensor (model) parallelism: attention heads and MLP / expert hidden widths

Every parameter carries logical axis names (`ec_dit.nn.param`); `config.mesh.rules`
maps each logical name to mesh axes, in the spirit of t5x's MoE rules. A
PartitionSpec is built per parameter by `logical_to_spec`:

* a mesh axis is used at most once per array: when two logical axes of one
  array map to the same mesh axis, the later dimension drops it;
* mesh axes of size 1 are left out;
* a dimension not divisible by the mesh axes it maps to keeps the longest
  prefix of those axes whose product divides it; if none divides it, that
  dimension is replicated (e.g. the tiny model's 4 experts on an expert axis of 8,
  or a batch of 4 over 8 data devices). Correct, only less parallel.

Activations are constrained in the MoE layer (`constrain`), which reads the
mesh and rules of the enclosing `activation_sharding` context at trace time
and does nothing outside one (single-device code and tests are unchanged).
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Sequence

import jax
import numpy as np
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# (logical axis, mesh axes) pairs. Parameters: expert, expert_mlp, mlp, heads, embed,
# vocab, patch, modulation, unmodeled. Activations: batch (images, or routing groups
# before dispatch), expert_group (routing groups after dispatch: the batch minus the
# expert axis, which then holds the experts).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp", "expert")),
    ("expert_group", ("data", "fsdp")),
    ("expert", "expert"),
    ("expert_mlp", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("embed", "fsdp"),
    ("vocab", None),
    ("patch", None),
    ("modulation", None),
    ("unmodeled", None),
    ("channels", "fsdp"),  # VAE conv / norm / attention channels (ec_dit.encoders.vae): FSDP-split like embed
    ("kernel_spatial", None),  # conv kernel height and width (ec_dit.encoders.vae)
)


def mesh_defaults() -> ml_collections.ConfigDict:
  """Defaults of `config.mesh`: all devices on `data` (single-device training unchanged)."""
  return ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1, rules=DEFAULT_RULES))


def _fail(field: str, allowed: str, got: Any):
  raise ValueError(f"config.{field}: must be {allowed}, got {got!r}")


def _as_axes(target) -> tuple[str, ...]:
  if target is None:
    return ()
  if isinstance(target, str):
    return (target,)
  return tuple(target)


def validate_mesh(mesh_config, prefix: str = "mesh") -> None:
  """Checks `config.mesh` (without knowing the device count); raises ValueError naming the field."""
  sizes = [mesh_config[a] for a in MESH_AXES]
  for axis, size in zip(MESH_AXES, sizes):
    if isinstance(size, bool) or not isinstance(size, int) or not (size == -1 or size >= 1):
      _fail(f"{prefix}.{axis}", "a positive integer or -1 (the rest of the devices)", size)
  if sizes.count(-1) > 1:
    _fail(prefix, "at most one axis of size -1", dict(zip(MESH_AXES, sizes)))
  rules = mesh_config.rules
  if not isinstance(rules, (tuple, list)):
    _fail(f"{prefix}.rules", "a tuple of (logical axis, mesh axes) pairs", rules)
  seen = set()
  for rule in rules:
    if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
      _fail(f"{prefix}.rules", "pairs (logical axis name, None | mesh axis | tuple of mesh axes)", rule)
    if rule[0] in seen:
      _fail(f"{prefix}.rules", f"one rule per logical axis; {rule[0]!r} appears twice", rule)
    seen.add(rule[0])
    target = rule[1]
    if not (target is None or isinstance(target, str) or
            (isinstance(target, (tuple, list)) and all(isinstance(t, str) for t in target))):
      _fail(f"{prefix}.rules", "pairs (logical axis name, None | mesh axis | tuple of mesh axes)", rule)
    axes = _as_axes(target)
    for a in axes:
      if a not in MESH_AXES:
        _fail(f"{prefix}.rules", f"mesh axes among {MESH_AXES}", rule)
    if len(set(axes)) != len(axes):
      _fail(f"{prefix}.rules", "no mesh axis twice in one rule", rule)


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
  """The (data, fsdp, expert, tensor) sizes for `num_devices`, resolving -1."""
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"config.mesh: {dict(zip(MESH_AXES, sizes))} cannot fill {num_devices} devices "
                       f"({num_devices} is not a multiple of {known})")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"config.mesh: {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} devices, "
                     f"but there are {num_devices}")
  return tuple(sizes)


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The device mesh of the config over `devices` (default: all devices of all processes).

  `jax.make_mesh` orders the devices for the physical topology (ICI rings on
  TPU) and, across hosts, keeps the innermost axes within a host; the outer
  axes (data, fsdp) span hosts.
  """
  validate_mesh(mesh_config)
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if devices == list(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=types)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=types)


def rules_dict(rules) -> dict[str, tuple[str, ...]]:
  return {name: _as_axes(target) for name, target in rules}


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules) -> P:
  """The PartitionSpec of an array with logical `axes` (None = replicated) and `shape`.

  See the module docstring for the rules: no mesh axis twice (the later dimension
  drops it), size-1 mesh axes left out, non-divisible dimensions fall back to the
  longest dividing prefix of their mesh axes, else to replication.
  """
  if len(axes) != len(shape):
    raise ValueError(f"axes {tuple(axes)} must name each of the {len(shape)} dims of {tuple(shape)}")
  table = rules if isinstance(rules, dict) else rules_dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(axes, shape):
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise ValueError(f"logical axis {name!r} has no rule in config.mesh.rules (rules: {sorted(table)})")
    chosen, product = [], 1
    for mesh_axis in table[name]:
      size = mesh.shape[mesh_axis]
      if mesh_axis in used or size == 1:
        continue
      if dim % (product * size):
        break  # keep the longest prefix that divides the dimension
      chosen.append(mesh_axis)
      product *= size
    used.update(chosen)
    spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def named_sharding(axes, shape, mesh: Mesh, rules) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_shardings(param_state, mesh: Mesh, rules) -> dict:
  """NamedShardings (as a pure dict) of an nnx State of Params, from their `out_sharding` axes."""
  from flax import nnx

  def one(variable):
    axes = variable.get_metadata().get("out_sharding")
    if axes is None:
      return replicated(mesh)
    return named_sharding(axes, variable.shape, mesh, rules)

  tree = jax.tree.map(one, param_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree


def batch_sharding(mesh: Mesh, rules, batch_size: int, ndim: int = 1) -> NamedSharding:
  """Sharding of a [batch, ...] input: batch over the `batch` rule's mesh axes."""
  return named_sharding(("batch",) + (None,) * (ndim - 1), (batch_size,) + (1,) * (ndim - 1), mesh, rules)


def abstract(tree, shardings):
  """ShapeDtypeStructs of `tree`'s leaves carrying `shardings` (a matching tree)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# ----------------------------------------------------------------------------
# Activation constraints

_context = threading.local()


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules):
  """Within this context, `constrain` places activations on `mesh` by `rules` (read at trace time)."""
  previous = getattr(_context, "value", None)
  _context.value = (mesh, rules_dict(rules))
  try:
    yield
  finally:
    _context.value = previous


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical axes; the identity outside `activation_sharding`."""
  ctx = getattr(_context, "value", None)
  if ctx is None:
    return x
  mesh, table = ctx
  return jax.lax.with_sharding_constraint(x, named_sharding(axes, x.shape, mesh, table))


def current_mesh() -> Mesh | None:
  ctx = getattr(_context, "value", None)
  return None if ctx is None else ctx[0]


# ----------------------------------------------------------------------------
# Training state: abstract first, then a jitted, sharded initialisation


def opt_state_shardings(opt_abs, params_abs, params_sh, default) -> Any:
  """Shardings of an optimizer state: each leaf that mirrors a parameter takes its sharding.

  A state leaf mirrors a parameter when its key path ends with the
  parameter's path and the shapes agree (Adam's moments, Muon's momentum,
  also inside ``optax.partition``'s masked states, which
  ``optax.tree_map_params`` does not see through); counts and other scalars
  get ``default``.
  """
  by_path = {tuple(path): (p.shape, s) for (path, p), s in
             zip(jax.tree_util.tree_flatten_with_path(params_abs)[0], jax.tree.leaves(params_sh))}

  def pick(path, x):
    for i in range(len(path)):
      hit = by_path.get(tuple(path[i:]))
      if hit is not None and hit[0] == x.shape:
        return hit[1]
    return default

  return jax.tree_util.tree_map_with_path(pick, opt_abs)


def train_state_shardings(config, tx, mesh: Mesh):
  """(graphdef, abstract state, abstract ema, shardings) without allocating any weights.

  The abstract model comes from `nnx.eval_shape`; the optimizer state's shape
  from `jax.eval_shape(tx.init)`, its shardings mirror the parameters'
  (`opt_state_shardings`), scalars (counts, step) are replicated. `shardings`
  is {"state", "ema", "batch"} with "batch" the sharding of a [batch_size, ...]
  leaf's leading axis.
  """
  from flax import nnx
  from ec_dit import model as model_lib

  rules = config.mesh.rules
  abstract_model = nnx.eval_shape(lambda: model_lib.TextToImage(config, rngs=nnx.Rngs(config.seed)))
  graphdef, param_state = nnx.split(abstract_model, nnx.Param)
  params_sh = param_shardings(param_state, mesh, rules)
  params_abs = abstract(nnx.to_pure_dict(param_state), params_sh)
  opt_abs = jax.eval_shape(tx.init, params_abs)
  rep = replicated(mesh)
  opt_sh = opt_state_shardings(opt_abs, params_abs, params_sh, rep)
  state_sh = {"step": rep, "params": params_sh, "opt_state": opt_sh}
  state_abs = {"step": jax.ShapeDtypeStruct((), np.int32, sharding=rep), "params": params_abs,
               "opt_state": abstract(opt_abs, opt_sh)}
  shardings = {"state": state_sh, "ema": params_sh, "batch": batch_sharding(mesh, rules, config.batch_size)}
  return graphdef, state_abs, params_abs, shardings


def batch_shardings(batch, mesh: Mesh, rules) -> Any:
  """Per-leaf shardings of a (global) batch pytree: leading axis by the `batch` rule."""
  return jax.tree.map(lambda x: batch_sharding(mesh, rules, x.shape[0], len(x.shape)), batch)
