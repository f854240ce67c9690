"""A roofline estimate of one train step on a TPU chip, from the TPU compiler's own figures.

It is an estimate, not a measurement. Per device:
  compute time    = compiled FLOPs / peak bf16 FLOP/s
  HBM time        = compiled bytes accessed / HBM bandwidth
  collective time = interconnect bytes of the compiled collectives / ICI bandwidth per chip
The step takes at least the largest of the three (perfect overlap) and at most their sum (no
overlap). What it ignores: MXU shapes and padding, vector-unit and transcendental work, fusion
and scheduling quality, latency of small collectives, the ICI topology (links per axis, hops,
contention; one chip's whole ICI bandwidth is assumed available to every collective), data
loading, the host, and the slower data-centre network between slices of a multi-slice run.
float32 matmuls are counted at the bf16 peak (TPUs run them as bf16 passes at default precision).

MFU counts model FLOPs only: 3 x the forward FLOPs of `model_summary.flops_per_image` (matmuls
and attention; = 6 x activated parameters x tokens + attention), without recomputation.
"""

from __future__ import annotations

import copy

from ec_dit.tools import model_summary
from ec_dit.tools.tpu_chips import Chip


def train_flops_per_image(model_config) -> float:
  """Model FLOPs of one training image (forward + backward = 3 x forward), at the training capacity factor."""
  m = copy.deepcopy(model_config)
  if m.ffn.kind == "expert_choice":
    with m.unlocked():
      m.ffn.eval_capacity_factor = m.ffn.train_capacity_factor
  return 3.0 * model_summary.flops_per_image(m)


def estimate(chip: Chip, *, flops: float, bytes_accessed: float, ici_bytes: float, model_flops: float,
             batch_size: int, num_devices: int) -> dict[str, float]:
  """Roofline step time, images/s per chip and MFU of a step (per-device FLOPs, bytes; global batch)."""
  compute_s = flops / chip.peak_flops
  hbm_s = bytes_accessed / chip.hbm_bandwidth
  collective_s = ici_bytes / chip.ici_bandwidth
  overlap_s = max(compute_s, hbm_s, collective_s)
  serial_s = compute_s + hbm_s + collective_s
  mfu = lambda s: model_flops / (s * num_devices * chip.peak_flops) if s > 0 else 0.0  # noqa: E731
  ips = lambda s: batch_size / s / num_devices if s > 0 else 0.0  # noqa: E731
  return {
      "compute_s": compute_s, "hbm_s": hbm_s, "collective_s": collective_s,
      "step_s_overlap": overlap_s, "step_s_serial": serial_s,
      "images_per_s_per_chip_overlap": ips(overlap_s), "images_per_s_per_chip_serial": ips(serial_s),
      "mfu_overlap": mfu(overlap_s), "mfu_serial": mfu(serial_s),
      "bound": max((("compute", compute_s), ("hbm", hbm_s), ("collective", collective_s)), key=lambda x: x[1])[0],
  }
