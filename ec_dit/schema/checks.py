"""What every config check in the schema shares: the one error format and the type tests.

    fail("model.depth", "an integer >= 1", 0)   # ValueError: config.model.depth: must be an integer >= 1, got 0
"""

from __future__ import annotations

import numbers
from typing import Any


def fail(field: str, allowed: str, got: Any):
  """Raises the ValueError every config check raises: `config.FIELD: must be ALLOWED, got GOT`."""
  raise ValueError(f"config.{field}: must be {allowed}, got {got!r}")


def is_int(v) -> bool:
  """An integer (Python or numpy), not a bool: the check every config validator uses."""
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_number(v) -> bool:
  """A real number (int or float, Python or numpy), not a bool."""
  return isinstance(v, numbers.Real) and not isinstance(v, bool)
