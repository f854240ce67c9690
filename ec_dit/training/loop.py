"""Training: `train(config, workdir)` and `train_and_evaluate(config, workdir)`.

The loop reads top to bottom in lifecycle order: workdir and config, input,
mesh, model and optimizer, checkpoint (resume), train step, loop (with
sample grids and preemption), and, in `train_and_evaluate`, the final
GenEval-style scoring. The training state is a pure pytree of arrays (see
`ec_dit.training.state`), so a resumed run's losses equal an uninterrupted
run's bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import jax
import numpy as np

from ec_dit import checkpoint, images as images_lib, routing_maps, schema, sharding, tokenizer as tokenizer_lib
from ec_dit.data import latents, pipeline as data_pipeline, sources
from ec_dit.geneval import generate
from ec_dit.inference import TextToImagePipeline
from ec_dit.model import abstract_params
from ec_dit.training import metrics as metrics_lib, optimizers, state as state_lib, step as step_lib


# ----------------------------------------------------------------------------
# Preemption

class Preemption:
  """Turns SIGTERM (how TPU VMs are preempted) into a flag the loop checks after each step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: leave signals alone
      self._previous = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


# ----------------------------------------------------------------------------
# Sample grids

GRID_IMAGES_PER_PROMPT = 4


def sample_grid_pipeline(config):
  """The pipeline for the periodic sample grids: built once per run, so the sampler compiles once."""
  params = abstract_params(config)  # replaced by the EMA weights before every use
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


# ----------------------------------------------------------------------------
# The loop


def _tokenize(config):
  """The trainable encoder's tokenizer; None for prepared latents, whose examples hold T5 features
  (their shapes are checked against the model here, before anything is built)."""
  kind, folder = schema.parse_source(config.input.source)
  if kind == "latents":
    latents.check_compatible(latents.read_manifest(folder), config.model)
    return None
  return tokenizer_lib.tokenizer_from_config(config).encode


def train(config, workdir: str) -> dict[str, Any]:
  """Trains (resuming from the latest good checkpoint in workdir). Returns the last metrics.

  After a SIGTERM the returned dict also holds `"preempted": True` (the run saved a
  checkpoint at the current step and stopped early).
  """
  # -- Workdir and config --------------------------------------------------
  schema.validate(config)
  sources.check_source(config.input)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config.to_dict(), f, indent=2, default=list)
  writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)

  # -- Input ---------------------------------------------------------------
  dataset = data_pipeline.create_dataset(
      config.input, batch_size=config.batch_size, tokenize=_tokenize(config), seed=config.input.data_seed,
      process_index=jax.process_index(), process_count=jax.process_count(), context_len=config.model.context_len)
  data_iter = iter(dataset)

  # -- Mesh, model and optimizer (sharded, abstract first) ----------------
  mesh = sharding.make_mesh(config.mesh)
  tx = optimizers.make_optimizer(config)
  _, abstract_state, abstract_ema, shardings = state_lib.train_state_shardings(config, tx, mesh)
  step_lib.check_batch_split(config, shardings["batch"])
  graphdef, state, ema = state_lib.init_state(config, tx, mesh)

  # -- Checkpoint: resume from the latest good one (onto this mesh, whatever mesh saved it)
  manager = checkpoint.make_manager(workdir, keep=config.keep_checkpoints)
  restored = checkpoint.restore_latest_good(manager, abstract_state, abstract_ema, data_iter, report=writer.message)
  if restored is not None:
    start, state, ema, data_iter = restored
    writer.message(f"resumed from step {start} in {checkpoint.checkpoint_dir(workdir)}")
  start = int(state["step"])

  # -- Step ----------------------------------------------------------------
  train_step = step_lib.make_train_step(config, graphdef, tx)

  # -- Loop ----------------------------------------------------------------
  metrics: dict[str, Any] = {}
  grid_pipe = None
  progress = metrics_lib.progress_bar(config.num_train_steps, start, enabled=is_main)
  t_last, steps_since = time.time(), 0
  with Preemption() as preemption:
    for step in range(start + 1, config.num_train_steps + 1):
      batch = data_pipeline.global_batch(next(data_iter), shardings["batch"])
      state, ema, metrics = train_step(state, ema, batch)
      loss = float(metrics["loss"])
      if not (np.isfinite(loss) and bool(metrics["params_finite"])):  # fail fast, never checkpoint NaN
        manager.wait_until_finished()
        progress.close()
        what = f"non-finite loss {loss}" if not np.isfinite(loss) else "non-finite parameters"
        raise FloatingPointError(f"{what} at step {step}; stopping. The last checkpoint "
                                 f"(step {manager.latest_step()}) is intact.")
      progress.update(1)
      steps_since += 1
      if step % config.log_every_steps == 0 or step == config.num_train_steps:
        now = time.time()
        scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
        scalars["steps_per_sec"] = steps_since / max(now - t_last, 1e-9)
        t_last, steps_since = now, 0
        writer.write_scalars(step, scalars)
        progress.set_postfix(loss=f"{loss:.4f}")
      if step % config.checkpoint_every_steps == 0 or step == config.num_train_steps:
        checkpoint.save(manager, step, state, ema, data_iter)
      if config.eval_every_steps and step % config.eval_every_steps == 0 and is_main:
        grid_pipe = grid_pipe or sample_grid_pipeline(config)
        write_sample_grid(config, grid_pipe, ema, workdir, step, writer)
        routing_maps.write_training_routing_maps(config, ema, workdir, step, writer, pipe=grid_pipe)
      if preemption.requested:
        writer.message(f"SIGTERM at step {step}: saving a checkpoint and exiting")
        checkpoint.save(manager, step, state, ema, data_iter, force=True)
        break
  progress.close()
  manager.wait_until_finished()
  manager.close()
  writer.close()
  result: dict[str, Any] = {k: float(v) for k, v in jax.device_get(metrics).items()}
  if preemption.requested:
    result["preempted"] = True
  return result


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains, then generates the GenEval-style prompt set and prints the score table.

  A preempted run (SIGTERM) exits after its checkpoint instead: scoring a half-trained
  model would take minutes the VM does not have and print a score for the wrong run.
  Rerunning the same command resumes training and then evaluates.
  """
  result = train(config, workdir)
  if result.get("preempted"):
    return result
  return generate.evaluate_run(config, workdir)
