"""Device mesh and logical-to-mesh sharding rules (config.mesh).

The mesh has four named axes, sized by the config (-1 = the rest of the devices):

  data    pure data parallelism: params replicated, batch split
  fsdp    data parallelism with parameters (and optimizer state) split over `embed`
          (ZeRO-3 style; XLA all-gathers each weight where it is used)
  expert  expert parallelism: experts split over it; between MoE layers it also
          splits the batch, so dispatch and combine become all-to-alls
  tensor  tensor (model) parallelism: attention heads and MLP / expert hidden widths

Every parameter carries logical axis names (`ec_dit.primitives.param`); `config.mesh.rules`
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
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ec_dit import schema

MESH_AXES = schema.MESH_AXES
DEFAULT_RULES = schema.DEFAULT_RULES


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
  schema.validate_mesh(mesh_config)
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if devices == list(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=types)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=types)


def rules_dict(rules) -> dict[str, tuple[str, ...]]:
  return {name: schema.as_axes(target) for name, target in rules}


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


# ----------------------------------------------------------------------------
# Optimizer state


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

