"""Multi-host training from the CLI: 2 processes x 4 CPU devices == 1 process x 8 devices.

Both processes run `python -m ec_dit.main --mode=train` with --coordinator_address,
--num_processes and --process_id (gloo collectives), each reading only its shard of
the data. The same run in one process with 8 devices gives the same losses; there
the steps after the second-to-last checkpoint run again on another mesh, (1, 2, 2, 2)
instead of (8, 1, 1, 1): a checkpoint restores onto a different mesh shape and
training continues with equal losses. A SIGTERM to one of the two processes stops
both at the same step, and a second launch resumes bit for bit. One uninterrupted two-process
run (a module fixture: each launch compiles anew, so launches are what these tests cost) is the
reference of both tests.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ec_dit.training import loop
from helpers import REPO, free_port, read_losses, train_config, xla_flags

MESH = dict(data=2, fsdp=2, expert=2, tensor=1)  # data spans the two processes
OVERRIDES = {
    "model.input_size": 16, "model.patch_size": 4, "model.hidden_size": 32, "model.depth": 2,
    "model.num_heads": 2, "model.context_dim": 32, "model.context_len": 12, "model.ffn.num_experts": 8,
    "text.depth": 1, "text.num_heads": 2, "text.vocab_size": 512,
    "input.image_size": 16, "input.read_threads": 0,
    "batch_size": 8, "warmup_steps": 2, "learning_rate": 1e-3, "log_every_steps": 1,
    "checkpoint_every_steps": 8, "eval_every_steps": 0, "heldout.num_examples": 8,
    **{f"mesh.{k}": v for k, v in MESH.items()},
}


def _start_two_processes(workdir, num_train_steps, stderr=(subprocess.PIPE, subprocess.PIPE), **overrides):
  port = free_port()
  # No compilation cache (tests/conftest.py sets one): a process that finds its program there reaches the
  # first collective while the other still compiles, and gloo gives up waiting after 30 s on a busy machine.
  env = dict(os.environ, XLA_FLAGS=xla_flags(4), JAX_PLATFORMS="cpu",
             PYTHONPATH=str(REPO), JAX_ENABLE_COMPILATION_CACHE="false")
  flags = [f"--config.{k}={v}" for k, v in dict(OVERRIDES, num_train_steps=num_train_steps, **overrides).items()]
  return [subprocess.Popen(
      [sys.executable, "-m", "ec_dit.main", f"--config={REPO / 'tests' / 'micro_config.py'}",
       f"--workdir={workdir}", "--mode=train", f"--coordinator_address=localhost:{port}",
       "--num_processes=2", f"--process_id={i}", *flags],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=stderr[i], text=True) for i in range(2)]


def _launch_two_processes(workdir, num_train_steps, **overrides):
  procs = _start_two_processes(workdir, num_train_steps, **overrides)
  outputs = []
  for p in procs:
    try:
      outputs.append(p.communicate(timeout=300))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for i, (p, (out, err)) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i} failed:\n{err[-3000:]}"
  return outputs


STEPS = 16  # checkpoints at 8 and 16; the held-out loss at 16


def _single_process_config(num_train_steps, mesh):
  config = train_config(batch_size=8, num_train_steps=num_train_steps,
                        checkpoint_every_steps=OVERRIDES["checkpoint_every_steps"])
  config.model.ffn.num_experts = 8
  config.mesh.data, config.mesh.fsdp, config.mesh.expert, config.mesh.tensor = mesh
  return config


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted two-process run of STEPS steps: (workdir, [(stdout, stderr) of each process])."""
  workdir = tmp_path_factory.mktemp("multihost") / "reference"
  return workdir, _launch_two_processes(workdir, STEPS)


def test_two_processes_match_one_process_and_checkpoints_restore_on_another_mesh(reference, tmp_path, capsys):
  multi, outputs = reference
  single = tmp_path / "single"
  assert sorted(read_losses(multi)) == list(range(1, STEPS + 1))
  assert sorted(int(p.name) for p in (multi / "checkpoints").iterdir() if p.name.isdigit()) == [8, 16]
  # only process 0 draws the progress bar (and writes logs); the held-out loss ran on both
  assert "train:" in outputs[0][1] and "train:" not in outputs[1][1]
  assert any("heldout/loss" in row for row in map(json.loads, open(multi / "metrics.jsonl")))

  loop.train(_single_process_config(STEPS, (8, 1, 1, 1)), str(single))  # checkpoints written on (8, 1, 1, 1)
  shutil.rmtree(single / "checkpoints" / str(STEPS))  # as if stopped at 8: steps 9-16 run again...
  capsys.readouterr()
  loop.train(_single_process_config(STEPS, (1, 2, 2, 2)), str(single))  # ...restored onto (1, 2, 2, 2)
  assert "resumed from step 8" in capsys.readouterr().err
  expected, got = read_losses(single), read_losses(multi)  # the last line of a step wins: 9-16 on (1, 2, 2, 2)
  assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)], [expected[s] for s in range(1, STEPS + 1)],
                             rtol=1e-5)


def test_sigterm_to_one_process_stops_both_at_the_same_step_and_the_resume_is_exact(reference, tmp_path):
  """Item 9 of issue 16: each process catches its own signals; the loop agrees on stopping every step."""
  (ref, _), run, steps = reference, tmp_path / "run", STEPS
  # the only checkpoint is the one SIGTERM asks for; no held-out loss (neither changes the losses)
  cadence = {"checkpoint_every_steps": 1000, "heldout.every_steps": 0}
  logs = [open(tmp_path / f"p{i}.txt", "w+") for i in range(2)]
  procs = _start_two_processes(run, steps, stderr=logs, **cadence)
  try:
    deadline = time.time() + 300
    while not ((run / "metrics.jsonl").exists() and read_losses(run) and max(read_losses(run)) >= 3):
      assert time.time() < deadline and all(p.poll() is None for p in procs), (
          (tmp_path / "p0.txt").read_text()[-3000:] + (tmp_path / "p1.txt").read_text()[-3000:])
      time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)  # only process 1 is told
    for i, p in enumerate(procs):
      p.communicate(timeout=300)
      assert p.returncode == 0, f"process {i}: " + (tmp_path / f"p{i}.txt").read_text()[-3000:]
  finally:  # a failed start must not leave the other process waiting for its peer
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  err0, err1 = ((tmp_path / f"p{i}.txt").read_text() for i in range(2))
  (saved,) = [int(p.name) for p in (run / "checkpoints").iterdir()]  # one step, saved by both processes
  assert saved < steps and f"a stop request on another process at step {saved}: saving" in err0
  assert "SIGTERM: saving" in err1 and "SIGTERM" not in err0.replace("a stop request", "")
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= {p.name for p in (run / "checkpoints" / str(saved) /
                                                                           "data_iter").iterdir()}
  assert max(read_losses(run)) == saved
  _launch_two_processes(run, steps, **cadence)  # resumes from the agreed step
  expected, got = read_losses(ref), read_losses(run)
  assert sorted(got) == sorted(expected) == list(range(1, steps + 1))
  assert [got[s] for s in range(1, steps + 1)] == [expected[s] for s in range(1, steps + 1)]  # bit for bit
