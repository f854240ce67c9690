"""Starting JAX's multi-controller runtime, for every entry point (training, prepare).

On TPU VM pod slices (and SLURM / Open MPI clusters) everything is detected
automatically; elsewhere (several CPU or GPU machines, or processes on one
machine) pass the coordinator address, the process count and this process's
index. CPU processes use the gloo collectives.
"""

from __future__ import annotations

import os

import jax


def auto_detected_cluster() -> bool:
  """True on a multi-host TPU VM slice, or under a multi-task SLURM / Open MPI launch."""
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return ("," in hosts or int(os.environ.get("SLURM_NTASKS", "1")) > 1
          or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)


def initialize(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> None:
  """Starts the runtime when launched as several processes; else does nothing.

  Must run before any JAX computation. Raises ValueError naming the flags when
  they are given incompletely or inconsistently.
  """
  given = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in given):
    if any(v is None for v in given):
      raise ValueError("--coordinator_address, --num_processes and --process_id go together")
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
    if num_processes == 1:
      return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU cross-process collectives
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
  elif auto_detected_cluster():
    jax.distributed.initialize()  # TPU VM pod slice / SLURM / Open MPI: everything auto-detected
