"""Training loop: end to end, resume equals uninterrupted, SIGTERM, SIGKILL, NaN, logs."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ec_dit import evaluators, inference
from ec_dit.training import loop, step as step_lib
from helpers import REPO, read_losses, train_config

RUNNER = pathlib.Path(__file__).with_name("train_runner.py")


def _start(workdir, mode="train", **overrides):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(pathlib.Path(__file__).parent)]))
  return subprocess.Popen([sys.executable, str(RUNNER), str(workdir), json.dumps(overrides), mode], env=env,
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(workdir, step, proc, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"run ended early: {proc.communicate()[1][-2000:]}")
    if (workdir / "metrics.jsonl").exists() and max(read_losses(workdir) or {0: 0}) >= step:
      return
    time.sleep(0.2)
  raise AssertionError("timed out waiting for training steps")


def _checkpoint_steps(workdir):
  d = workdir / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def test_end_to_end_train_and_evaluate(tmp_path, capsys):
  config = train_config(eval_every_steps=3)
  scores = evaluators.train_and_evaluate(config, str(tmp_path))
  losses = read_losses(tmp_path)
  assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(np.isfinite(list(losses.values())))
  row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
  assert "moe/layer_01/experts_per_token_mean" in row and row["moe/layer_01/experts_per_token_mean"] == 2.0
  assert json.loads((tmp_path / "config.json").read_text())["model"]["ffn"]["kind"] == "expert_choice"
  assert (tmp_path / "samples" / "step_0000003.png").exists()
  assert list((tmp_path / "tensorboard").iterdir())
  assert set(scores) >= {"overall", "single_object", "colors", "position", "counting", "two_object", "color_attr"}
  assert (tmp_path / "geneval" / "results.jsonl").exists()
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert json.loads(last)["overall"] == pytest.approx(scores["overall"])
  assert _checkpoint_steps(tmp_path) == [2, 4, 6]
  # sample mode from the finished run
  paths = inference.sample_to_files(str(tmp_path), ["a photo of a blue square", ""], num_images=2)
  assert len(paths) == 4 and all(os.path.exists(p) for p in paths)
  # the harness CLI generates GenEval's layout from the run
  prompts = tmp_path / "geneval" / "prompts.jsonl"
  out = subprocess.run([sys.executable, "-m", "ec_dit.geneval", "generate", "--workdir", str(tmp_path),
                        "--prompts", str(prompts), "--out", str(tmp_path / "gen"), "--n", "2", "--quiet"],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
  assert out.returncode == 0, out.stderr[-2000:]
  check = subprocess.run([sys.executable, "-m", "ec_dit.geneval", "validate", "--prompts", str(prompts),
                          "--images", str(tmp_path / "gen"), "--n", "2"], capture_output=True, text=True, cwd=REPO)
  assert check.returncode == 0 and "complete" in check.stdout, check.stdout + check.stderr


@pytest.mark.parametrize("variant", ["tc", "dense"])
def test_other_ffn_kinds_train(tmp_path, variant):
  metrics = loop.train(train_config(variant, num_train_steps=2), str(tmp_path))
  assert np.isfinite(metrics["loss"])
  if variant == "tc":
    assert "moe/layer_01/balance_loss" in metrics


def test_resume_after_sigkill_equals_uninterrupted(tmp_path):
  ref, run = tmp_path / "ref", tmp_path / "run"
  loop.train(train_config(num_train_steps=8), str(ref))
  proc = _start(run, num_train_steps=8)
  _wait_for_step(run, 5, proc)
  proc.kill()  # no chance to save: resume from the last completed checkpoint
  proc.wait()
  assert _checkpoint_steps(run)  # at least the step-2 or step-4 checkpoint survived
  loop.train(train_config(num_train_steps=8), str(run))
  expected, got = read_losses(ref), read_losses(run)
  assert sorted(got) == list(range(1, 9))
  for step in range(1, 9):
    assert got[step] == expected[step], step  # bit for bit


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  # the default mode, train_and_evaluate: a preempted run must exit, not go on to score
  proc = _start(tmp_path, "train_and_evaluate", num_train_steps=10_000, checkpoint_every_steps=10_000)
  _wait_for_step(tmp_path, 3, proc)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  assert "SIGTERM" in err
  assert not (tmp_path / "geneval").exists(), "evaluated after SIGTERM"
  last_logged = max(read_losses(tmp_path))
  assert _checkpoint_steps(tmp_path) == [last_logged]
  # and the run continues from there
  metrics = loop.train(train_config(num_train_steps=last_logged + 2), str(tmp_path))
  assert max(read_losses(tmp_path)) == last_logged + 2 and np.isfinite(metrics["loss"])


def test_non_finite_loss_stops_the_run_and_keeps_good_checkpoints(tmp_path, monkeypatch):
  original = step_lib.make_train_step

  def make_poisoned(config, abstract, tx):
    step_fn = original(config, abstract, tx)

    def poisoned(state, ema, batch):
      step = int(state["step"]) + 1
      state, ema, metrics = step_fn(state, ema, batch)
      if step >= 3:
        metrics = dict(metrics, loss=jax.numpy.nan)
      return state, ema, metrics
    return poisoned

  monkeypatch.setattr(step_lib, "make_train_step", make_poisoned)
  with pytest.raises(FloatingPointError, match="non-finite loss nan at step 3"):
    loop.train(train_config(), str(tmp_path))
  assert _checkpoint_steps(tmp_path) == [2]
  assert max(read_losses(tmp_path)) == 2  # the bad step was never logged either


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, capsys):
  loop.train(train_config(num_train_steps=4), str(tmp_path))
  assert _checkpoint_steps(tmp_path) == [2, 4]
  for f in (tmp_path / "checkpoints" / "4" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  loop.train(train_config(num_train_steps=6), str(tmp_path))
  err = capsys.readouterr().err
  assert "checkpoint at step 4 failed to restore" in err and "resumed from step 2" in err
  assert max(read_losses(tmp_path)) == 6


def test_bad_config_fails_before_anything_is_written(tmp_path):
  config = train_config()
  config.model.ffn.kind = "switch"
  with pytest.raises(ValueError, match="config.model.ffn.kind"):
    loop.train(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
