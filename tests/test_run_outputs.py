"""What a finished run leaves and says (issue 30): a final grid and routing map however short the run, the
model-size line, the "wrote" block; `--mode=sample` without `--config` takes `--config.sample.*` overrides and
refuses model overrides; `--prompt=""` is refused; a failed start leaves no workdir behind."""

import contextlib
import io
import os
import subprocess
import sys

import pytest

from ec_dit import configs, evaluators, tasks
from ec_dit.training import loop, report
from dit_moe_fixtures import class_config
from helpers import REPO, train_config

ENV = dict(os.environ, PYTHONPATH=str(REPO))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 20-step micro run whose grid cadence (1000) it never reaches, trained and evaluated."""
  workdir = tmp_path_factory.mktemp("run") / "short"
  config = train_config(num_train_steps=20, eval_every_steps=1000, checkpoint_every_steps=10, log_every_steps=5)
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    evaluators.train_and_evaluate(config, str(workdir))
  return workdir, config, err.getvalue()


def test_a_short_run_ends_with_a_grid_a_routing_map_and_a_wrote_block(run):
  workdir, config, log = run
  assert (workdir / "samples" / "step_0000020.png").is_file()  # the last step, though 20 < eval_every_steps
  assert (workdir / "routing_maps" / "step_0000020.png").is_file()
  params = tasks.task_for(config).abstract_params(config)
  size = report.count_params(params)
  assert size > 0 and f"model: {report._human(size)} parameters" in log
  assert log.index("model: ") < log.index("wrote:")
  wrote = log[log.index("wrote:"):].splitlines()
  assert wrote[1].split() == ["workdir", str(workdir)]
  assert wrote[2].split() == ["checkpoint", str(workdir / "checkpoints" / "20"), "(step", "20)"]
  assert wrote[3].split() == ["sample", "grids", str(workdir / "samples" / "step_0000020.png")]
  assert wrote[4].split() == ["routing", "maps", str(workdir / "routing_maps" / "step_0000020.png")]
  assert str(workdir / "geneval" / "summary.json") in wrote[5] and (workdir / "geneval" / "summary.json").is_file()
  assert wrote[6].split() == ["TensorBoard", "tensorboard", "--logdir", str(workdir / "tensorboard")]


def test_the_run_prints_its_expected_duration(run):
  _, _, log = run
  (line,) = [x[x.index("expected: "):] for x in log.splitlines() if "expected: " in x]  # after the bar's \r
  # step 1 compiles; steps 3..7 (a quarter of the run) are timed; 13 remain
  assert " min for the remaining 13 steps at " in line and line.endswith("(sample grids and GenEval not included)")


def _sample(workdir, *args):
  return subprocess.run([sys.executable, "-m", "ec_dit.main", f"--workdir={workdir}", "--mode=sample",
                         "--prompt=a photo of a red circle", "--num_images=1", *args],
                        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


def test_sample_uses_the_runs_config_and_takes_sampler_overrides(run):
  workdir, _, _ = run
  out = _sample(workdir)  # no --config: the run's own
  assert out.returncode == 0, out.stderr[-2000:]
  (path,) = out.stdout.split()
  default = open(path, "rb").read()
  out = _sample(workdir, "--config.sample.num_steps=1", "--config.sample.guidance_scale=0.0")
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == [path] and open(path, "rb").read() != default


def test_a_model_override_or_an_empty_prompt_on_a_finished_run_is_refused(run):
  workdir, _, _ = run
  out = _sample(workdir, "--config.model.depth=4")
  assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
  assert "config.model.depth: 2 -> 4" in out.stderr and "--mode=sample" in out.stderr
  out = _sample(workdir, f"--config={REPO / 'tests' / 'micro_config.py'}")  # another model: refused, not ignored
  assert out.returncode == 2 and "whose model cannot change" in out.stderr, out.stderr
  out = subprocess.run([sys.executable, "-m", "ec_dit.main", f"--workdir={workdir}", "--mode=sample", "--prompt="],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and "--prompt: empty prompt" in out.stderr, out.stderr


def test_model_differences_ignore_sampling_and_training_fields(run):
  workdir, config, _ = run
  given = configs.from_run(str(workdir))
  given.sample.num_steps, given.num_train_steps, given.input.source = 7, 99, "shapes_world"
  assert configs.model_differences(configs.from_run(str(workdir)), given) == []
  given.model.ffn.num_experts = 8
  assert configs.model_differences(configs.from_run(str(workdir)), given) == [("model.ffn.num_experts", 4, 8)]


def test_a_failed_start_removes_only_the_workdir_it_created(tmp_path):
  config = class_config()  # a class-conditional model without labelled latents: fails after the workdir exists
  with pytest.raises(ValueError, match="trains on prepared latents"):
    loop.train(config, str(tmp_path / "new"))
  assert not (tmp_path / "new").exists()
  (tmp_path / "mine").mkdir()
  with pytest.raises(ValueError, match="trains on prepared latents"):
    loop.train(config, str(tmp_path / "mine"))
  assert (tmp_path / "mine").is_dir()  # the user's folder stays
