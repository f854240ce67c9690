"""TPU devices without a TPU: a pod slice's devices from libtpu's topology description.

`topology_devices("v5p:4x4x4")` returns the 64 devices of that slice. They cannot run
anything, but `jit(...).lower(...).compile()` on a mesh over them runs the real TPU compiler
(libtpu, pinned in requirements.txt), so memory, cost and the compiled HLO are the TPU's.

libtpu complains at start-up when it cannot find TPU metadata, and takes a lock file that
keeps a second process out; `quiet_libtpu` sets the variables it reads to harmless values first. `cpu_unless_accelerator` keeps the CLI's CPU
default free of that noise on a machine with no TPU or GPU at all.
"""

from __future__ import annotations

import glob
import os
import pathlib
import re

import jax
from jax.experimental import topologies

GENERATIONS = ("v4", "v5e", "v5p", "v6e")
_NAME = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$")
_GOOGLE_PCI_VENDOR = "0x1ae0"
# PCI device ids of TPU chips v3 .. 7x (as in jax._src.hardware_utils; Google's NICs share the vendor id)
_TPU_PCI_DEVICES = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")


def _tpu_visible() -> bool:
  """True when a Google TPU chip is on this machine's PCI bus (how JAX itself detects one)."""
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    device = pathlib.Path(vendor).with_name("device")
    if (pathlib.Path(vendor).read_text().strip() == _GOOGLE_PCI_VENDOR
        and device.exists() and device.read_text().strip() in _TPU_PCI_DEVICES):
      return True
  return False


def cpu_unless_accelerator() -> None:
  """Selects JAX's CPU backend (JAX_PLATFORMS=cpu) when it is unset and no TPU or NVIDIA GPU is present.

  With libtpu installed, JAX would otherwise try to start a TPU runtime and print libtpu's
  complaints on every CPU run. Must run before JAX initialises its backends.
  """
  if "JAX_PLATFORMS" not in os.environ and not _tpu_visible() and not os.path.exists("/dev/nvidia0"):
    os.environ["JAX_PLATFORMS"] = "cpu"  # for subprocesses
    jax.config.update("jax_platforms", "cpu")  # JAX read the variable when it was imported


def quiet_libtpu() -> None:
  """Sets the TPU metadata variables libtpu reads at start-up, if unset (it only warns without them)."""
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  # compile only, no chip is opened: several processes (tests under xdist) may load libtpu at once
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def parse(name: str) -> tuple[str, tuple[int, ...]]:
  """("v5p", (4, 4, 4)) from "v5p:4x4x4"; a one-line error naming the allowed form otherwise."""
  match = _NAME.match(name or "")
  if not match:
    raise ValueError(f"--topology={name!r}: expected GENERATION:AxB[xC] with GENERATION one of "
                     f"{', '.join(GENERATIONS)}, e.g. v5p:4x4x4, v6e:16x16, v5e:2x2")
  return match.group(1), tuple(int(s) for s in match.group(2).split("x"))


def topology_devices(name: str, num_slices: int = 1) -> list:
  """The devices of `num_slices` pod slices of topology `name` (compile only; nothing runs on them)."""
  parse(name)
  if num_slices < 1:
    raise ValueError(f"--num_slices={num_slices}: must be at least 1")
  quiet_libtpu()
  kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
  try:
    desc = topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs)
  except Exception as e:  # libtpu missing, or a shape libtpu rejects: one line naming the flag
    raise ValueError(f"--topology={name} (--num_slices={num_slices}): libtpu could not describe it: "
                     f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
  return list(desc.devices)
