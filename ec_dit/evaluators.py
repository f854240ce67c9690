"""What a training run does besides training, handed to the loop as callables (as big_vision names its
evaluators): sample grids and routing maps of the EMA weights at every eval step, GenEval-style scoring at the end.

    from ec_dit import evaluators
    evaluators.train_and_evaluate(config, workdir)   # the CLI's default mode: train with the jobs, then GenEval
    evaluators.train(config, workdir)                # --mode=train: train with the jobs

The training loop (`ec_dit.training.loop`) imports no sampling pipeline, figure or
evaluation; it calls the jobs it is given (`loop.PeriodicJob`).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

import jax

from ec_dit import images as images_lib, routing_maps, tasks
from ec_dit.geneval import generate
from ec_dit.inference import TextToImagePipeline
from ec_dit.training import loop

GRID_IMAGES_PER_PROMPT = 4


def sample_grid_pipeline(config) -> TextToImagePipeline:
  """The pipeline for the periodic sample grids: built once per run, so the sampler compiles once."""
  params = tasks.task_for(config).abstract_params(config)  # replaced by the EMA weights before every use
  return TextToImagePipeline(config, params, batch_size=len(config.sample.prompts) * GRID_IMAGES_PER_PROMPT)


def write_sample_grid(config, pipe, ema, workdir: str, step: int, writer) -> str:
  """Samples the config's fixed prompts with the EMA weights and writes a PNG grid."""
  n = GRID_IMAGES_PER_PROMPT
  pipe.params = ema
  images = pipe.generate(list(config.sample.prompts), num_images_per_prompt=n, seed=config.sample.seed)
  grid = images_lib.make_grid(list(images), cols=n)
  path = os.path.join(workdir, "samples", f"step_{step:07d}.png")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  images_lib.save_png(grid, path)
  writer.write_image(step, "samples", grid)
  return path


class SampleGrids:
  """Job: `write_sample_grid` (workdir/samples/step_N.png and the TensorBoard image "samples").

  Its pipeline (`pipeline`) is built at the first use and kept, so the sampler compiles once per run.
  """

  def __init__(self, config):
    self.config = config
    self._pipeline = None

  @property
  def pipeline(self) -> TextToImagePipeline:
    if self._pipeline is None:
      self._pipeline = sample_grid_pipeline(self.config)
    return self._pipeline

  def __call__(self, step: int, params, workdir: str, writer) -> str:
    return write_sample_grid(self.config, self.pipeline, params, workdir, step, writer)


class RoutingMaps:
  """Job: `routing_maps.write_training_routing_maps` with the grids' pipeline (its compiled model reused)."""

  def __init__(self, config, grids: SampleGrids):
    self.config, self.grids = config, grids

  def __call__(self, step: int, params, workdir: str, writer) -> str | None:
    return routing_maps.write_training_routing_maps(self.config, params, workdir, step, writer,
                                                    pipe=self.grids.pipeline)


def periodic_jobs(config) -> list[loop.PeriodicJob]:
  """The jobs at every `config.eval_every_steps` and the last step: sample grid, then routing map.

  No jobs for a class-conditional run, which has no prompts (`--mode=sample --class_label` samples it).
  """
  if tasks.task_for(config).conditioning != tasks.TEXT:
    return []
  grids = SampleGrids(config)
  return [grids, RoutingMaps(config, grids)]


def _report(text: str) -> None:
  if jax.process_index() == 0:
    print(text, file=sys.stderr, flush=True)


def final_evaluation(config) -> Callable[[str], Any]:
  """The job after training: `generate.evaluate_run` (GenEval-style prompts, scores printed and returned).

  A class-conditional run gets none: the job says so and returns None (the loop keeps the training metrics).
  """
  if tasks.task_for(config).conditioning != tasks.TEXT:
    def no_geneval(workdir: str) -> None:
      _report(f"no GenEval for class-conditional runs: sample with python -m "
              f"ec_dit.main --mode=sample --workdir={workdir} --class_label=N")
    return no_geneval
  return lambda workdir: generate.evaluate_run(config, workdir)


def train(config, workdir: str, *, list_outputs: bool = True) -> dict[str, Any]:
  """`loop.train` with the periodic jobs (`periodic_jobs`): what `--mode=train` runs."""
  return loop.train(config, workdir, list_outputs=list_outputs, jobs=periodic_jobs(config))


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """`loop.train_and_evaluate` with the periodic jobs and GenEval at the end: the CLI's default mode.

  Returns the GenEval scores (a class-conditional or preempted run: the last training metrics).
  """
  return loop.train_and_evaluate(config, workdir, jobs=periodic_jobs(config), evaluate=final_evaluation(config))
