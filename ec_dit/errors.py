"""The project's error classes for expected failures: bad files, fields or disks, never bugs.

Every command line (`ec_dit.main`, `ec_dit.prepare`, `ec_dit.convert`,
`ec_dit.geneval`) catches `EcDitError` (and a full disk, `is_disk_full`) in its
`main` and prints the message as one line with exit code 2; anything else is a
bug and keeps its traceback. A message names the file or field and what is
allowed. The classes also subclass ValueError, so callers that caught
ValueError before keep working. This module imports nothing from ec_dit: every
layer may raise these.
"""

from __future__ import annotations

import errno
import sys

EXIT_CODE = 2


class EcDitError(ValueError):
  """An expected failure whose message is complete for the user (one line, naming the file or field)."""


class UsageError(EcDitError):
  """A command line used wrongly (a missing or contradictory flag); the message ends with a pointer to --help."""

  def __str__(self) -> str:
    return f"{super().__str__()} (--help lists the flags)"


class CheckpointError(EcDitError):
  """A checkpoint or weights file that cannot be read safely, or does not fit the config."""


class DataError(EcDitError):
  """Input data (images, captions, prepared shards, manifests) that is bad or does not fit the run."""


class PrepareError(DataError):
  """`prepare` must not continue in this output folder (e.g. a resume with different settings)."""


class EvaluationError(EcDitError):
  """Samples or metadata that evaluation refuses to score."""


def is_disk_full(e: BaseException) -> bool:
  """Whether `e` is an OSError for a full disk or quota (ENOSPC, EDQUOT)."""
  return isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1))


def one_line(e: BaseException) -> str:
  """The message of an expected failure as one line (`error: ...`)."""
  text = str(e) if not is_disk_full(e) else f"no space left on device writing {e.filename or '?'} ({e.strerror})"
  return "error: " + " | ".join(line.strip() for line in text.splitlines() if line.strip())


# What every command line treats as an expected failure, beside a full disk (`run_cli`).
EXPECTED = (EcDitError, ValueError, FileNotFoundError, FileExistsError)


def run_cli(body, *args, expected: tuple = (), **kwargs):
  """`body(*args, **kwargs)` for a command line's `main`: its result, or EXIT_CODE after printing an expected failure
  (`EXPECTED`, `expected`, a full disk) as one line. Anything else is a bug and keeps its traceback."""
  try:
    return body(*args, **kwargs)
  except EXPECTED + tuple(expected) as e:
    return report(e)
  except OSError as e:
    if not is_disk_full(e):
      raise
    return report(e)


def report(e: BaseException, stream=None) -> int:
  """Prints `one_line(e)` to stderr and returns the exit code for expected failures (2)."""
  print(one_line(e), file=stream or sys.stderr, flush=True)
  return EXIT_CODE
