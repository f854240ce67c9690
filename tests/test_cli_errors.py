"""Every command line's expected mistakes are one line naming what is wrong, exit code 2 (issues 27 and 30).

A newcomer's typos (a config file that does not exist, a bad variant, a missing flag, a malformed
value) used to print absl's 60-line usage dump or ml_collections' traceback. Each case here runs the
real command in a subprocess (nothing compiles: every check happens before JAX does any work).
"""

import os
import subprocess
import sys

import pytest

from helpers import REPO

ENV = dict(os.environ, PYTHONPATH=str(REPO))
TINY = str(REPO / "configs" / "ec_dit_tiny.py")


def _run(module, *args):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                        timeout=300)


@pytest.mark.parametrize("args, expected", [
    (["--config=configs/no_such.py", "--workdir=/tmp/x"], "--config=configs/no_such.py: configs/no_such.py does not exist"),
    ([f"--config={TINY}:nosuch", "--workdir=/tmp/x"], "config variant must be one of"),
    ([f"--config={TINY}", "--mode=sample"], "--workdir is required for --mode=sample"),
    ([f"--config={TINY}", "--mode=nosuch"], "flag --mode=nosuch: value should be one of"),
    ([f"--config={TINY}", "--config.num_train_steps=abc"], "flag --config.num_train_steps=abc"),
    ([f"--config={TINY}", "--config.num_trian_steps=5"], "--config.num_trian_steps: unknown config key"),
    ([f"--config={TINY}", "--workdir=/tmp/no_such_run", "--mode=sample", "--prompt=a"], "does not exist"),
])
def test_main_mistakes_are_one_line_and_exit_2(args, expected):
  out = _run("ec_dit.main", *args)
  assert out.returncode == 2, out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], out.stderr


@pytest.mark.parametrize("args, expected", [
    ([f"--config={TINY}"], "--out is required"),
    (["--out=/tmp/x"], "--config is required"),
    ([f"--config={TINY}", "--out=/tmp/x", "--source=folder:/no/such/folder"], "config.input.source"),
])
def test_prepare_mistakes_are_one_line_and_exit_2(args, expected):
  out = _run("ec_dit.prepare", *args)
  assert out.returncode == 2, out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], out.stderr


def test_help_still_lists_the_flags():
  out = _run("ec_dit.main", "--helpshort")  # absl's own help (its exit code is absl's choice)
  text = out.stdout + out.stderr
  assert "Command-line entry point" in text and "--workdir" in text and "error:" not in text
