"""`--mode=compile --topology=NAME`: the train step compiled by the real TPU compiler, and what it says.

  python -m ec_dit.main --config=configs/ec_dit_xl.py --mode=compile --topology=v5p:4x4x4 \\
      --config.mesh.fsdp=2 --config.mesh.expert=32 --config.model.remat_policy=full

The mesh is `sharding.make_mesh(config.mesh)` over the devices of the named pod slice
(`tpu_topology`), and the step is `compile_report.compile_train_step`'s. The report gives, per
device: HBM (arguments, temporaries, total) against the chip's, FLOPs and bytes accessed from
the executable's cost analysis, the collectives in its HLO (`hlo_collectives`), and a roofline
estimate of the step (`roofline`, which says what it ignores). Nothing runs; no weights exist.
"""

from __future__ import annotations

import json
from typing import Any

from ec_dit import sharding
from ec_dit.tools import compile_report, hlo_collectives, roofline, tpu_chips, tpu_topology

GiB = tpu_chips.GiB
ESTIMATE_NOTE = ("roofline estimate, not a measurement: max/sum of compute, HBM and ICI times; ignores MXU "
                 "padding, vector work, scheduling, collective latency, ICI topology and contention, input and host")


def _cost(compiled) -> dict[str, float]:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {"flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0))}


def analyse(compiled, config, mesh, *, topology: str, num_slices: int, info: dict, param_dtype: str) -> dict:
  """The report of a train step compiled for TPU devices (see module docstring)."""
  device = mesh.devices.flat[0]
  chip = tpu_chips.chip_for(device.device_kind)
  mem = compiled.memory_analysis()
  args, temp = mem.argument_size_in_bytes, mem.temp_size_in_bytes
  total = args + mem.output_size_in_bytes - mem.alias_size_in_bytes + temp
  cost = _cost(compiled)
  colls = hlo_collectives.collectives(compiled.as_text())
  ici = sum(c["ici_bytes"] for c in colls.values())
  model_flops = roofline.train_flops_per_image(config.model) * config.batch_size
  est = roofline.estimate(chip, flops=cost["flops"], bytes_accessed=cost["bytes_accessed"], ici_bytes=ici,
                          model_flops=model_flops, batch_size=config.batch_size, num_devices=mesh.size)
  return {
      "backend": device.device_kind, "chip": chip.name, "topology": topology, "num_slices": num_slices,
      "devices": int(mesh.size), "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "num_params": info["num_params"], "batch_size": int(config.batch_size),
      "remat_policy": config.model.remat_policy, "dtype": config.model.dtype, "param_dtype": param_dtype,
      "argument_gib": args / GiB, "temp_gib": temp / GiB, "total_gib": total / GiB,
      "chip_hbm_gib": chip.hbm_bytes / GiB, "fits": total <= chip.hbm_bytes,
      "margin_gib": (chip.hbm_bytes - total) / GiB,
      "flops_per_device": cost["flops"], "bytes_accessed_per_device": cost["bytes_accessed"],
      "model_flops_per_step": model_flops,
      "collectives": {k: {"count": v["count"], "gib": v["bytes"] / GiB, "ici_gib": v["ici_bytes"] / GiB}
                      for k, v in colls.items()},
      **{k: v for k, v in est.items()},
      "lower_seconds": info["lower_seconds"], "compile_seconds": info["compile_seconds"],
      "note": ESTIMATE_NOTE,
  }


def tpu_report(config, topology: str, *, num_slices: int = 1, param_dtype: str = "float32") -> dict[str, Any]:
  """Compiles the train step of `config` for `num_slices` slices of `topology` and analyses it."""
  devices = tpu_topology.topology_devices(topology, num_slices)
  mesh = sharding.make_mesh(config.mesh, devices)
  compiled, info = compile_report.compile_train_step(config, mesh, param_dtype=param_dtype)
  return analyse(compiled, config, mesh, topology=topology, num_slices=num_slices, info=info,
                 param_dtype=param_dtype)


def _round(v):
  if isinstance(v, float):
    return float(f"{v:.4g}")
  if isinstance(v, dict):
    return {k: _round(x) for k, x in v.items()}
  return v


def format_report(r: dict[str, Any]) -> str:
  """A table of the report, then the report as one JSON line."""
  mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
  ms = lambda s: f"{s * 1e3:10.1f} ms"  # noqa: E731
  slices = f" x {r['num_slices']} slices" if r["num_slices"] > 1 else ""
  lines = [
      f"train step compiled by the TPU compiler for {r['devices']} x {r['backend']} ({r['topology']}{slices}), "
      f"mesh {mesh}",
      f"params {r['num_params'] / 1e9:.2f}B, global batch {r['batch_size']}, remat {r['remat_policy']}, "
      f"compute {r['dtype']}, params {r['param_dtype']} (lower {r['lower_seconds']}s, "
      f"compile {r['compile_seconds']}s)",
      f"{'per-device HBM':<30}{'GiB':>12}",
      f"{'arguments':<30}{r['argument_gib']:>12.2f}",
      f"{'temporaries':<30}{r['temp_gib']:>12.2f}",
      f"{'total':<30}{r['total_gib']:>12.2f}",
      f"{'chip HBM (' + r['chip'] + ')':<30}{r['chip_hbm_gib']:>12.2f}   fits: {'yes' if r['fits'] else 'NO'}, "
      f"margin {r['margin_gib']:.2f} GiB",
      f"{'FLOPs per device':<30}{r['flops_per_device'] / 1e12:>9.2f} TF",
      f"{'bytes accessed per device':<30}{r['bytes_accessed_per_device'] / GiB:>8.1f} GiB",
      f"{'collective':<22}{'count':>8}{'GiB/step':>12}{'ICI GiB':>12}",
  ]
  for kind, c in r["collectives"].items():
    lines.append(f"{kind:<22}{c['count']:>8}{c['gib']:>12.3f}{c['ici_gib']:>12.3f}")
  lines += [
      f"roofline per step ({r['note']}):",
      f"  compute {ms(r['compute_s'])}   HBM {ms(r['hbm_s'])}   collectives {ms(r['collective_s'])}"
      f"   ({r['bound']}-bound)",
      f"  step, overlapped {ms(r['step_s_overlap'])}: {r['images_per_s_per_chip_overlap']:.1f} images/s/chip, "
      f"MFU {100 * r['mfu_overlap']:.1f}%",
      f"  step, serial     {ms(r['step_s_serial'])}: {r['images_per_s_per_chip_serial']:.1f} images/s/chip, "
      f"MFU {100 * r['mfu_serial']:.1f}%",
      json.dumps(_round(r)),
  ]
  return "\n".join(lines)
