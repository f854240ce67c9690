"""What the absl command lines (`ec_dit.main`, `ec_dit.prepare`) share: flag parsing with mistakes as one line and
exit code 2, their `main` (`run_main`) and the multi-process start (`initialize_distributed`).

absl answers a usage mistake with the module docstring and every flag (60 lines), and
ml_collections answers a `--config` file that is missing or fails to load with a
traceback. A newcomer needs the one line that matters: here a missing `--config`
file, a config that does not load (a bad variant), a malformed flag, a required
flag left out, or an `errors.UsageError` raised after parsing, are printed as
`error: ...` with a pointer to `--help`, and the process exits with code 2.
"""

from __future__ import annotations

import os
import sys

from absl import flags, logging

from ec_dit import distributed, errors


def flag_value(argv, name: str) -> str | None:
  """The last value of `--name=V` or `--name V` in argv, else None."""
  value = None
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def exit_with(message: str) -> None:
  """Prints `error: message` (one line) and exits with code 2."""
  sys.exit(errors.report(errors.UsageError(message)))


def _flag_error_line(e: flags.Error) -> str:
  """absl's flag error as one line: a config file's failure is its exception's last line, not the traceback."""
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  if any(line.startswith("Traceback") for line in lines):
    head = lines[0].split(": Error whilst", 1)[0]
    return f"{head}: {lines[-1]}"
  return " ".join(lines)


def parse_flags(argv, *, required: tuple[str, ...] = ()):
  """absl's parsing of `argv` into `flags.FLAGS` (returns the remaining arguments), with one-line errors."""
  if any(arg in ("--help", "-h", "--helpshort", "--helpfull", "-?") for arg in argv[1:]):
    return flags.FLAGS(argv)  # absl prints the help and exits
  spec = flag_value(argv, "config")
  if spec is not None:
    path = spec.split(":", 1)[0]
    if not os.path.isfile(path):
      exit_with(f"--config={spec}: {path} does not exist; give a config file, e.g. "
                f"--config=configs/ec_dit_tiny.py (or file.py:VARIANT)")
  missing = [name for name in required if flag_value(argv, name) is None]
  if missing:
    exit_with(f"--{missing[0]} is required")
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    exit_with(_flag_error_line(e))


def run_main(run, argv, *, expected: tuple = ()) -> None:
  """An absl command line's `main`: `run(argv)` once positional arguments are refused and absl's INFO logging
  is quieted (Orbax logs every save at INFO; the progress bar says enough). An expected failure
  (`errors.run_cli`: bad input, `expected`, a full disk) is printed as one line and exits with code 2."""
  if errors.run_cli(_checked_run, run, argv, expected=expected):
    sys.exit(errors.EXIT_CODE)


def _checked_run(run, argv) -> None:
  if len(argv) > 1:
    raise errors.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  run(argv)


def initialize_distributed() -> None:
  """`distributed.initialize` from the --coordinator_address, --num_processes and --process_id flags (which the
  command line defines); flags given incompletely or inconsistently are an `errors.UsageError`."""
  f = flags.FLAGS
  try:
    distributed.initialize(f.coordinator_address, f.num_processes, f.process_id)
  except ValueError as e:
    raise errors.UsageError(str(e)) from None
