"""Ahead-of-time compilation of the train step: does a config fit its mesh? (`--mode=compile`)

Lowers and compiles the real train step (`ec_dit.training.step.make_train_step`, of the config's task, with
its in/out shardings and donation) for the configured mesh, from abstract
inputs only (`jax.ShapeDtypeStruct`s with shardings): no weight is ever
allocated, so a 97B model can be checked on a laptop with fake CPU devices:

  XLA_FLAGS=--xla_force_host_platform_device_count=64 JAX_PLATFORMS=cpu \\
    python -m ec_dit.main --config=configs/ec_dit_xl.py --mode=compile \\
      --config.mesh.fsdp=8 --config.mesh.expert=8 --config.model.remat_policy=full

and prints XLA's per-device memory analysis (arguments, outputs, temporaries)
as a table and one JSON line. Numbers come from the backend that compiles: on
fake CPU devices they are the CPU compiler's buffer assignment, which is NOT a
TPU's (for XL several times the TPU's: docs/scaling.md).
For a TPU's figures use `--topology=NAME` (`ec_dit.tools.tpu_report`).
"""

from __future__ import annotations

import copy
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ec_dit import sharding, tasks
from ec_dit.moe import grouped
from ec_dit.training import optimizers, state as state_lib, step as step_lib

GiB = 1024 ** 3
PARAM_DTYPES = ("float32", "bfloat16")


def abstract_batch(config, mesh) -> dict:
  """ShapeDtypeStructs of one global training batch, sharded like the train step expects (the task's batch)."""
  return tasks.task_for(config).abstract_batch(
      config, sharding.batch_sharding(mesh, config.mesh.rules, config.batch_size))


def _cast(tree, dtype):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
      if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def for_platform(config, platform: str):
  """`config` with `model.ffn.dropless_impl = "auto"` resolved for `platform`, the devices compiled for
  (at trace time "auto" reads JAX's default backend, which is the CPU when compiling for a TPU topology)."""
  if config.model.ffn.get("dropless_impl") != "auto":
    return config
  config = copy.deepcopy(config)
  config.model.ffn.dropless_impl = grouped.resolve_impl("auto", platform)
  return config


def compile_train_step(config, mesh=None, *, param_dtype: str = "float32"):
  """(compiled, info): the train step compiled for `mesh` (default: the config's) from abstract inputs.

  `param_dtype` "bfloat16" stores parameters, EMA and Adam moments in bfloat16
  for this analysis only (training keeps float32 parameters).
  """
  if param_dtype not in PARAM_DTYPES:
    raise ValueError(f"param_dtype must be one of {PARAM_DTYPES}, got {param_dtype!r}")
  mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
  config = for_platform(config, mesh.devices.flat[0].platform)
  tx = optimizers.make_optimizer(config)
  t0 = time.time()
  abstract = state_lib.abstract_state(config, tx, mesh)
  state, ema = abstract.state, abstract.ema
  if param_dtype != "float32":
    dtype = jnp.dtype(param_dtype)
    state = dict(state, params=_cast(state["params"], dtype), opt_state=_cast(state["opt_state"], dtype))
    ema = _cast(ema, dtype)
  step = step_lib.make_train_step(config, abstract, tx)
  lowered = step.lower(state, ema, abstract_batch(config, mesh))
  t1 = time.time()
  compiled = lowered.compile()
  t2 = time.time()
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
  info = dict(lower_seconds=round(t1 - t0, 1), compile_seconds=round(t2 - t1, 1), num_params=num_params)
  return compiled, info


def memory_report(config, mesh=None, *, param_dtype: str = "float32") -> dict[str, Any]:
  """Per-device memory of the compiled train step (GiB), with the mesh and settings it was compiled for."""
  mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
  compiled, info = compile_train_step(config, mesh, param_dtype=param_dtype)
  mem = compiled.memory_analysis()
  args = mem.argument_size_in_bytes
  out = mem.output_size_in_bytes
  alias = mem.alias_size_in_bytes  # outputs written into donated arguments
  temp = mem.temp_size_in_bytes
  return {
      "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "devices": int(mesh.size),
      "backend": mesh.devices.flat[0].platform,  # the devices compiled for, not JAX's default backend
      "num_params": info["num_params"],
      "batch_size": int(config.batch_size),
      "remat_policy": config.model.remat_policy,
      "dtype": config.model.dtype,
      "param_dtype": param_dtype,
      "argument_gib": args / GiB,
      "output_gib": out / GiB,
      "alias_gib": alias / GiB,
      "temp_gib": temp / GiB,
      # peak estimate: live arguments + outputs not written in place + temporaries
      "total_gib": (args + out - alias + temp) / GiB,
      "lower_seconds": info["lower_seconds"],
      "compile_seconds": info["compile_seconds"],
  }


def format_report(r: dict[str, Any]) -> str:
  """A table of the report, then the report as one JSON line."""
  mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
  lines = [
      f"train step compiled for {r['devices']} {r['backend']} devices, mesh {mesh}",
      f"params {r['num_params'] / 1e9:.2f}B, global batch {r['batch_size']}, remat {r['remat_policy']}, "
      f"compute {r['dtype']}, params {r['param_dtype']} (lower {r['lower_seconds']}s, "
      f"compile {r['compile_seconds']}s)",
      f"{'per-device memory':<28}{'GiB':>10}",
      f"{'arguments':<28}{r['argument_gib']:>10.3f}",
      f"{'outputs':<28}{r['output_gib']:>10.3f}",
      f"{'  of which donated (alias)':<28}{r['alias_gib']:>10.3f}",
      f"{'temporaries':<28}{r['temp_gib']:>10.3f}",
      f"{'total (args+out-alias+temp)':<28}{r['total_gib']:>10.3f}",
      json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}),
  ]
  return "\n".join(lines)
