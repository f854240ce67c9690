"""`--mode=plan --topology=NAME`: search mesh layouts for a config on a TPU slice, with the TPU compiler.

  python -m ec_dit.main --config=configs/ec_dit_m.py --mode=plan --topology=v5p:8x8x4

Knobs: the mesh (`fsdp` x `tensor`, with `expert` = the largest divisor of the device count
that divides the number of experts, and `data` the rest), the remat policy, the parameter
dtype and the batch per chip. Layouts whose parameters and optimizer state cannot fit the
chip's HBM are dropped before anything compiles (`state_bytes`). The rest are searched one
knob at a time from a base layout (coordinate descent: each knob's values are tried with the
others at the best so far, and the fastest layout that fits is kept).

Each layout is compiled at reduced depth (`DEPTHS` blocks, an MoE block and a dense one per
pair) and every figure (memory, FLOPs, bytes, collectives) is extrapolated linearly in depth
to the config's; `--mode=compile` of the printed command checks the extrapolation.
"""

from __future__ import annotations

import copy
import json
import math

from tqdm import tqdm

from ec_dit import sharding
from ec_dit.tools import compile_report, model_summary, roofline, tpu_chips, tpu_report, tpu_topology

DEPTHS = (2, 4)
REMATS = ("full", "dots")
PARAM_DTYPES = ("float32", "bfloat16")
BATCH_PER_CHIP = (1, 2, 4, 8)
STATE_COPIES = 5  # parameters, gradients, EMA, two Adam moments (same dtype here)
LINEAR = ("argument_gib", "temp_gib", "total_gib", "flops_per_device", "bytes_accessed_per_device")


def run_cli(config, mode: str, topology: str | None, *, num_slices: int, param_dtype: str, config_arg: str) -> None:
  """What `python -m ec_dit.main --mode=compile|plan --topology=...` does: prints the report or the plan."""
  if not topology:
    raise ValueError("--mode=plan needs --topology=NAME (e.g. --topology=v5p:4x4x4)")
  tpu_topology.parse(topology)
  if mode == "compile":
    print(tpu_report.format_report(tpu_report.tpu_report(config, topology, num_slices=num_slices,
                                                         param_dtype=param_dtype)), flush=True)
    return
  raise ValueError("--mode=plan: not implemented yet")
