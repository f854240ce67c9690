"""Our MoE code paths as the TPU compiler sees them (issue 28): one JSON line per path.

What is compiled
  The train step (forward, backward, AdamW) of a DiT-S-like EC-DiT: width 384, 4 blocks (2 MoE),
  6 heads, 8 experts of hidden 1536, 32x32x4 latents at patch 2 (256 tokens), batch 8 per chip,
  for a v5p:2x2x1 slice (4 chips), data parallel or expert parallel (`--expert`), with:
    ec_einsum    expert choice, one-hot einsum dispatch (EC-DiT's Algorithm 1)
    ec_gather    expert choice, gather / scatter-add dispatch
    tc_capacity  token choice top-2, capacity factor 2
    tc_dropless  token choice top-2, dropless (ragged_dot on TPU)
    tc_dropless_tiles  the same with the tile loop (`dropless_impl="tiles"`)
    dense        dense FFN at matched activated compute

Reported per path: the compiler's FLOPs and bytes accessed per device, per-device HBM, the
collectives, and the roofline step estimate (`ec_dit.tools.roofline`: an estimate, see there).

Usage
  python -m experiments.tpu_paths [--expert]      # ~1 min of CPU per path
"""

from __future__ import annotations

import argparse
import json

from ec_dit import schema, sharding, tasks
from ec_dit.tools import compile_report, tpu_report, tpu_topology

TOPOLOGY = "v5p:2x2x1"
PATHS = {
    "ec_einsum": dict(kind="expert_choice", dispatch="einsum"),
    "ec_gather": dict(kind="expert_choice", dispatch="gather"),
    "tc_capacity": dict(kind="token_choice", top_k=2, token_capacity_factor=2.0),
    "tc_dropless": dict(kind="token_choice", top_k=2, token_capacity_factor=0.0),
    "tc_dropless_tiles": dict(kind="token_choice", top_k=2, token_capacity_factor=0.0, dropless_impl="tiles"),
    "dense": dict(kind="dense"),
}


def path_config(ffn: dict, expert: int):
  config = schema.paper_config(hidden_size=384, depth=4, num_heads=6, num_experts=8)
  config.model.context_len = 32
  for k, v in ffn.items():
    config.model.ffn[k] = v
  config.batch_size = 32
  config.mesh.data, config.mesh.expert = (-1, 1) if expert == 1 else (1, expert)
  tasks.validate(config)
  return config


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--expert", action="store_true", help="expert parallel over the 4 chips (else data)")
  parser.add_argument("--paths", default=",".join(PATHS))
  args = parser.parse_args()
  tpu_topology.cpu_unless_accelerator()
  devices = tpu_topology.topology_devices(TOPOLOGY)
  for name in args.paths.split(","):
    config = path_config(PATHS[name], 4 if args.expert else 1)
    mesh = sharding.make_mesh(config.mesh, devices)
    compiled, info = compile_report.compile_train_step(config, mesh)
    r = tpu_report.analyse(compiled, config, mesh, topology=TOPOLOGY, num_slices=1, info=info,
                           param_dtype="float32")
    print(json.dumps({"benchmark": "tpu_paths", "path": name, "expert_parallel": args.expert,
                      "tflop_per_device": round(r["flops_per_device"] / 1e12, 4),
                      "gib_accessed_per_device": round(r["bytes_accessed_per_device"] / 2 ** 30, 3),
                      "total_gib": round(r["total_gib"], 3), "step_ms": round(r["step_s_overlap"] * 1e3, 3),
                      "bound": r["bound"], "mfu": round(r["mfu_overlap"], 4),
                      "collectives": {k: v["count"] for k, v in r["collectives"].items() if v["count"]},
                      "compile_seconds": info["compile_seconds"]}), flush=True)


if __name__ == "__main__":
  main()
