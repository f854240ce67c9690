"""Public figures of TPU chips, one row per generation, for the roofline (`ec_dit.tools.roofline`).

Sources (Google Cloud TPU documentation, "System architecture" pages, per chip):
  v4   https://cloud.google.com/tpu/docs/v4    275 TFLOP/s bf16, 32 GiB HBM2 at 1200 GB/s;
       ICI: six links of 50 GB/s per chip (Jouppi et al., "TPU v4", ISCA 2023) = 300 GB/s.
  v5e  https://cloud.google.com/tpu/docs/v5e   197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s,
       bidirectional ICI 400 GB/s per chip.
  v5p  https://cloud.google.com/tpu/docs/v5p   459 TFLOP/s bf16, 95 GiB HBM2e at 2765 GB/s,
       bidirectional ICI 1200 GB/s per chip (4800 Gbps).
  v6e  https://cloud.google.com/tpu/docs/v6e   918 TFLOP/s bf16, 32 GB HBM at 1640 GB/s,
       bidirectional ICI 800 GB/s per chip.
HBM sizes are taken as GiB, as the issue and Cloud's v4/v5p pages state them; the v5e and v6e
pages say "GB", so their figures may be up to 7% generous.
"""

from __future__ import annotations

import dataclasses

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip (one JAX device): peak bf16 FLOP/s, HBM bytes and bandwidth, ICI bandwidth (bytes/s)."""
  name: str
  peak_flops: float
  hbm_bytes: float
  hbm_bandwidth: float
  ici_bandwidth: float


CHIPS = {
    "v4": Chip("v4", 275e12, 32 * GiB, 1200e9, 300e9),
    "v5e": Chip("v5e", 197e12, 16 * GiB, 819e9, 400e9),
    "v5p": Chip("v5p", 459e12, 95 * GiB, 2765e9, 1200e9),
    "v6e": Chip("v6e", 918e12, 32 * GiB, 1640e9, 800e9),
}

# JAX's `device_kind` of each generation (libtpu 0.0.42) -> the row above.
DEVICE_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p",
                "TPU v6 lite": "v6e", "TPU v6e": "v6e"}


def chip_for(device_kind: str) -> Chip:
  """The table row of a JAX `device_kind` (e.g. "TPU v5"); a clear error for a chip not in the table."""
  if device_kind not in DEVICE_KINDS:
    raise ValueError(f"no chip figures for device kind {device_kind!r}; known: {sorted(DEVICE_KINDS)}")
  return CHIPS[DEVICE_KINDS[device_kind]]
