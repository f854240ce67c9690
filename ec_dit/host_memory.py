"""Host memory for XLA:CPU: reuse a step's temporary buffer instead of page-faulting it in every step.

XLA:CPU allocates an executable's temporaries with `posix_memalign` on one of its worker
threads and frees them when the step ends. glibc serves an allocation that large in a thread's
arena from a fresh `mmap` and unmaps it on free, so every step faults the whole buffer in again
and pays for it in kernel time (the sizes, fault counts and step times: docs/benchmarks.md,
"The last steps of issue 21").

`reuse_freed_memory()` sets glibc's malloc to one arena for all threads, no `mmap` for large
blocks and no trimming of the heap's free top: the freed buffer stays in the heap and the next
step reuses it. The cost: memory the process frees goes back to the heap, not to the system, so its
resident size stays at its peak, as with most allocators built for servers (tcmalloc,
jemalloc).

Threads pick their malloc arena on their first allocation, so call it first thing in a
process, before JAX's first computation: `python -m ec_dit.main` does. It changes nothing
off glibc (macOS, musl) and when `EC_DIT_HOST_MALLOC=default` is set.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt(3) parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
NEVER_TRIM = -1  # M_TRIM_THRESHOLD = -1 turns trimming off (mallopt(3))

ENV_VAR = "EC_DIT_HOST_MALLOC"


def reuse_freed_memory() -> bool:
  """Sets glibc's malloc to keep and reuse freed memory (module docstring); True if it was applied.

  False off Linux/glibc or when the environment variable `EC_DIT_HOST_MALLOC` is `default`;
  raises ValueError naming the variable for any other value but `reuse`.
  """
  choice = os.environ.get(ENV_VAR, "reuse")
  if choice not in ("reuse", "default"):
    raise ValueError(f"{ENV_VAR} must be 'reuse' or 'default', got {choice!r}")
  if choice == "default" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, NEVER_TRIM))
  return all(libc.mallopt(param, value) == 1 for param, value in settings)
