"""`--mode=plan --topology=NAME`: search mesh layouts for a config on a TPU slice, with the TPU compiler.

  python -m ec_dit.main --config=configs/ec_dit_m.py --mode=plan --topology=v5p:4x8x8

Knobs: the mesh (`fsdp` x `tensor`, with `expert` = the largest divisor of the device count
that divides the number of experts, and `data` the rest), the remat policy, the parameter
dtype and the batch per chip. Layouts whose parameters and optimizer state cannot fit the
chip's HBM are dropped before anything compiles (`state_bytes`). The rest are searched one
knob at a time from a base layout (coordinate descent: each knob's values are tried with the
others at the best so far, and the fastest layout that fits is kept): the mesh layouts without
tensor parallelism (tensor 2 only when none of them fits), then remat "dots", then bfloat16
parameters, then twice the batch per chip.

Each layout is compiled at reduced depth (`DEPTHS` blocks, an MoE block and a dense one per
pair) and every figure (memory, FLOPs, bytes, collectives) is extrapolated linearly in depth
to the config's; `--mode=compile` of the printed command checks the extrapolation.
"""

from __future__ import annotations

import copy
import dataclasses
import json

from tqdm import tqdm

from ec_dit import sharding, tasks
from ec_dit.tools import compile_report, model_summary, roofline, tpu_chips, tpu_report, tpu_topology

DEPTHS = (2, 4)
REMATS = ("full", "dots")
PARAM_DTYPES = ("float32", "bfloat16")
STATE_COPIES = 5  # parameters, gradients, EMA, two Adam moments (same dtype here)
STATE_SHARE = 0.85  # drop a layout whose state alone takes more than this share of HBM
LINEAR = ("argument_gib", "temp_gib", "total_gib", "flops_per_device", "bytes_accessed_per_device")


@dataclasses.dataclass(frozen=True)
class Layout:
  """One point of the search: mesh axes, remat policy, parameter dtype, images per chip."""
  data: int
  fsdp: int
  expert: int
  tensor: int
  remat: str
  param_dtype: str
  batch_per_chip: int

  def flags(self, num_devices: int) -> str:
    """The command-line overrides that select this layout."""
    return (f"--config.mesh.data={self.data} --config.mesh.fsdp={self.fsdp} --config.mesh.expert={self.expert} "
            f"--config.mesh.tensor={self.tensor} --config.model.remat_policy={self.remat} "
            f"--config.batch_size={self.batch_per_chip * num_devices} --param_dtype={self.param_dtype}")


def state_bytes(total_params: int, expert_params: int, layout: Layout) -> float:
  """Per-device bytes of parameters, gradients, EMA and Adam moments under `layout` (analytic, no compile):
  experts split over expert x fsdp x tensor, the other weights over fsdp x tensor."""
  width = 2 if layout.param_dtype == "bfloat16" else 4
  split = layout.fsdp * layout.tensor
  return STATE_COPIES * width * (expert_params / (split * layout.expert) + (total_params - expert_params) / split)


def _powers_of_two(n: int) -> list[int]:
  return [2 ** i for i in range(n.bit_length()) if n % 2 ** i == 0]


def layouts(config, num_devices: int, chip: tpu_chips.Chip) -> list[Layout]:
  """The mesh layouts worth compiling (remat full, the config's batch per chip, float32): `expert` the
  largest divisor of the devices that divides the experts, `tensor` 1 or 2; the two smallest `fsdp`
  whose state fits (`state_bytes`) with tensor 1, the smallest with tensor 2. Smallest state first."""
  stats = model_summary.summarize(config.model)
  m = config.model
  experts = m.ffn.num_experts if m.ffn.kind != "dense" else 1
  expert = max(d for d in _powers_of_two(num_devices) if experts % d == 0)
  per_chip = max(1, config.batch_size // num_devices)
  tensors = [t for t in (1, 2) if m.num_heads % t == 0 and num_devices % (expert * t) == 0]
  found = []
  for tensor in tensors:
    fitting = []
    for fsdp in _powers_of_two(num_devices // (expert * tensor)):
      layout = Layout(num_devices // (expert * tensor * fsdp), fsdp, expert, tensor, "full", "float32", per_chip)
      if state_bytes(stats["total_params"], stats["expert_params"], layout) <= STATE_SHARE * chip.hbm_bytes:
        fitting.append(layout)
    found += fitting[:2 if tensor == 1 else 1]
  return found


def _variant(config, layout: Layout, num_devices: int, depth: int | None = None):
  c = copy.deepcopy(config)
  c.mesh.data, c.mesh.fsdp, c.mesh.expert, c.mesh.tensor = layout.data, layout.fsdp, layout.expert, layout.tensor
  c.model.remat_policy = layout.remat
  c.batch_size = layout.batch_per_chip * num_devices
  if depth is not None:
    c.model.depth = depth
  tasks.validate(c)
  return c


def extrapolate(small: dict, large: dict, d_small: int, d_large: int, depth: int) -> dict:
  """Every per-step figure of `large` (compiled at depth d_large) moved linearly in depth to `depth`."""
  scale = (depth - d_large) / (d_large - d_small)
  line = lambda a, b: b + (b - a) * scale  # noqa: E731
  out = dict(large, **{k: line(small[k], large[k]) for k in LINEAR})
  out["collectives"] = {k: {f: line(small["collectives"][k][f], v[f]) for f in v}
                        for k, v in large["collectives"].items()}
  return out


def with_roofline(r: dict, config, chip: tpu_chips.Chip) -> dict:
  """`r` with fits, margin and the roofline recomputed from its (extrapolated) figures for `config`."""
  gib = tpu_chips.GiB
  model_flops = roofline.train_flops_per_image(config.model) * config.batch_size
  ici = sum(c["ici_gib"] for c in r["collectives"].values()) * gib
  est = roofline.estimate(chip, flops=r["flops_per_device"], bytes_accessed=r["bytes_accessed_per_device"],
                          ici_bytes=ici, model_flops=model_flops, batch_size=config.batch_size,
                          num_devices=r["devices"])
  out = dict(r, **est, model_flops_per_step=model_flops, fits=r["total_gib"] * gib <= chip.hbm_bytes,
             margin_gib=chip.hbm_bytes / gib - r["total_gib"], batch_size=int(config.batch_size),
             remat_policy=config.model.remat_policy)
  out.pop("num_params", None)  # the reduced-depth model's
  return out


def evaluate(config, layout: Layout, devices, chip, topology: str, num_slices: int) -> dict:
  """The layout's report for the full config, extrapolated from compiles at the reduced `DEPTHS`."""
  reports = []
  for depth in DEPTHS:
    c = _variant(config, layout, len(devices), depth)
    mesh = sharding.make_mesh(c.mesh, devices)
    compiled, info = compile_report.compile_train_step(c, mesh, param_dtype=layout.param_dtype)
    reports.append(tpu_report.analyse(compiled, c, mesh, topology=topology, num_slices=num_slices, info=info,
                                      param_dtype=layout.param_dtype))
    del compiled
  full = _variant(config, layout, len(devices))
  return with_roofline(extrapolate(*reports, *DEPTHS, config.model.depth), full, chip)


def _seconds_per_image(r: dict) -> float:
  return 1.0 / r["images_per_s_per_chip_overlap"] if r["images_per_s_per_chip_overlap"] else float("inf")


def plan(config, topology: str, *, num_slices: int = 1) -> list[tuple[Layout, dict]]:
  """Every layout tried with its extrapolated report, best first (fitting ones first, then by the
  estimated step time per image on a chip, overlapped)."""
  devices = tpu_topology.topology_devices(topology, num_slices)
  chip = tpu_chips.chip_for(devices[0].device_kind)
  n = len(devices)
  candidates = layouts(config, n, chip)
  if not candidates:
    raise ValueError(f"{topology} x {num_slices}: no layout keeps parameters and optimizer state under "
                     f"{STATE_SHARE:.0%} of {chip.name}'s {chip.hbm_bytes / tpu_chips.GiB:.0f} GiB; use more chips")
  results: dict[Layout, dict] = {}
  best = None
  bar = tqdm(desc="plan: layouts compiled", unit="layout")

  def run(options):
    nonlocal best
    for layout in options:
      if layout not in results:
        results[layout] = r = evaluate(config, layout, devices, chip, topology, num_slices)
        bar.update()
        bar.write(f"  {layout.flags(n)}: {r['total_gib']:.1f} GiB/device (fits: {r['fits']}), "
                  f"{r['images_per_s_per_chip_overlap']:.1f} images/s/chip, MFU {100 * r['mfu_overlap']:.1f}%")
    fitting = [lay for lay in results if results[lay]["fits"]]
    if fitting:
      best = min(fitting, key=lambda lay: _seconds_per_image(results[lay]))

  run([lay for lay in candidates if lay.tensor == 1])
  if best is None:  # tensor parallelism only when no layout without it fits
    run([lay for lay in candidates if lay.tensor > 1])
  for knob, values in (("remat", REMATS), ("param_dtype", PARAM_DTYPES), ("batch_per_chip", None)):
    if best is None:
      break
    values = (2 * best.batch_per_chip,) if knob == "batch_per_chip" else values
    run([dataclasses.replace(best, **{knob: v}) for v in values])
  bar.close()
  return sorted(results.items(), key=lambda kv: (not kv[1]["fits"], _seconds_per_image(kv[1])))


def format_plan(ranked: list[tuple[Layout, dict]], config_arg: str, topology: str, num_slices: int) -> str:
  """The fitting layouts as a table, best first, the command line of the best, and one JSON line."""
  n = ranked[0][1]["devices"]
  slices = f" --num_slices={num_slices}" if num_slices > 1 else ""
  header = (f"{'data':>5}{'fsdp':>5}{'exp':>5}{'tens':>5} {'remat':<6}{'params':<9}{'img/chip':>9}{'GiB/dev':>9}"
            f"{'margin':>8}{'step ms':>9}{'img/s/chip':>11}{'MFU':>7}  bound")
  lines = [f"layouts for {n} x {ranked[0][1]['backend']} ({topology}{slices}), extrapolated from compiles at "
           f"depths {DEPTHS[0]} and {DEPTHS[1]}; roofline estimates (overlapped), best first:", header]
  fitting = [(lay, r) for lay, r in ranked if r["fits"]]
  for lay, r in fitting:
    lines.append(f"{lay.data:>5}{lay.fsdp:>5}{lay.expert:>5}{lay.tensor:>5} {lay.remat:<6}{lay.param_dtype:<9}"
                 f"{lay.batch_per_chip:>9}{r['total_gib']:>9.1f}{r['margin_gib']:>8.1f}{r['step_s_overlap'] * 1e3:>9.1f}"
                 f"{r['images_per_s_per_chip_overlap']:>11.1f}{100 * r['mfu_overlap']:>6.1f}%  {r['bound']}")
  if len(fitting) < len(ranked):
    lines.append(f"({len(ranked) - len(fitting)} more tried that do not fit)")
  if not fitting:
    lines.append("no layout fits: use more chips (a larger --topology or --num_slices)")
  else:
    best = fitting[0][0]
    lines.append("best, check it with a full compile (then train with --workdir=... in place of --mode/--topology):")
    lines.append(f"  python -m ec_dit.main --config={config_arg} --mode=compile --topology={topology}{slices} "
                 f"{best.flags(n)}")
    if best.param_dtype != "float32":
      lines.append("  (bfloat16 parameters are a what-if of the analysis: training keeps float32 parameters)")
  rows = [dict(dataclasses.asdict(lay), fits=r["fits"], total_gib=round(r["total_gib"], 2),
               step_s=float(f"{r['step_s_overlap']:.4g}"), images_per_s_per_chip=round(r["images_per_s_per_chip_overlap"], 2),
               mfu=round(r["mfu_overlap"], 4)) for lay, r in ranked]
  lines.append(json.dumps({"topology": topology, "num_slices": num_slices, "devices": n, "layouts": rows}))
  return "\n".join(lines)




def run_cli(config, mode: str, topology: str | None, *, num_slices: int, param_dtype: str, config_arg: str) -> None:
  """What `python -m ec_dit.main --mode=compile|plan --topology=...` does: prints the report or the plan."""
  if not topology:
    raise ValueError("--mode=plan needs --topology=NAME (e.g. --topology=v5p:4x4x4)")
  tpu_topology.parse(topology)
  if mode == "compile":
    print(tpu_report.format_report(tpu_report.tpu_report(config, topology, num_slices=num_slices,
                                                         param_dtype=param_dtype)), flush=True)
    return
  print(format_plan(plan(config, topology, num_slices=num_slices), config_arg, topology, num_slices), flush=True)
