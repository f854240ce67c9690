"""Training: `train(config, workdir)` and `train_and_evaluate(config, workdir)`.

The loop reads top to bottom in lifecycle order: checks (config, workdir lock,
config against the checkpoints'), input, mesh, model and optimizer, checkpoint
(resume), and only then writes (config.json, metrics); then the train step and
the loop (with the periodic jobs it is given, and SIGTERM / SIGINT agreed across
processes), and, in `train_and_evaluate`, the evaluation it is given. The loop
imports no sampling pipeline, figure or evaluation: `ec_dit.evaluators` builds
those jobs (sample grids, routing maps, GenEval) and passes them in. The training
state is a pure pytree of arrays (see `ec_dit.training.state`), so a resumed run's
losses equal an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Any, Callable, Protocol, Sequence

import jax
import numpy as np

from ec_dit import checkpoint, schema, sharding, tasks, tokenizer as tokenizer_lib
from ec_dit.data import latents, pipeline as data_pipeline, sources
from ec_dit.training import (heldout as heldout_lib, metrics as metrics_lib, optimizers, preemption as preemption_lib,
                             report as report_lib, state as state_lib, step as step_lib, workdir as workdir_lib)


# ----------------------------------------------------------------------------
# Periodic jobs


class PeriodicJob(Protocol):
  """A job the loop runs on process 0 at every `config.eval_every_steps` and at the last step, after the
  step's checkpoint save has started: sample grids, routing maps (`ec_dit.evaluators.periodic_jobs`)."""

  def __call__(self, step: int, params: Any, workdir: str, writer: metrics_lib.MetricsWriter) -> Any:
    """`params` are the EMA weights (a pure dict); `writer` takes TensorBoard images (`write_image`)."""


# ----------------------------------------------------------------------------
# The loop


def _tokenize(config):
  """The trainable encoder's tokenizer; None for prepared latents, whose examples hold T5 features
  (their shapes are checked against the model here, before anything is built). The task checks the source
  first (a class-conditional run reads prepared latents with labels only)."""
  task = tasks.task_for(config)
  task.check_source(config)
  kind, folder = schema.parse_source(config.input.source)
  if kind == "latents":
    latents.check_compatible(latents.read_manifest(folder), config.model, text=task.needs_text_encoder,
                             where=os.path.join(folder, latents.MANIFEST))
    return None
  return tokenizer_lib.tokenizer_from_config(config).encode


def _reporter(enabled: bool):
  def report(text: str):
    if enabled:
      print(text, file=sys.stderr, flush=True)
  return report


def _lock(workdir: str, is_main: bool, report):
  """Process 0 takes the workdir's lock; every process learns whether it got it."""
  lock, error = None, None
  if is_main:
    try:
      lock = workdir_lib.Lock(workdir, report)
    except workdir_lib.WorkdirError as e:
      error = e
  failed, _ = preemption_lib.agree(error is not None)
  if error is not None:
    raise error
  if failed:
    raise workdir_lib.WorkdirError(f"process 0 could not lock {workdir} (see its log)")
  return lock


def _save(manager, workdir, step, state, ema, data_iter, pending, *, force=False) -> int:
  """Starts an async save of `step`; a failure (also of the previous, `pending` save) is one SaveError."""
  try:
    checkpoint.save(manager, step, state, ema, data_iter, iterator_args=data_pipeline.iterator_save_args, force=force)
  except Exception as e:  # noqa: BLE001 - surfaced as one message
    failed = pending if pending is not None and pending not in checkpoint.saved_steps(workdir) else step
    raise checkpoint.save_error(workdir, failed, e) from None
  return step


def _finish_saves(manager, workdir, pending) -> None:
  try:
    manager.wait_until_finished()
  except Exception as e:  # noqa: BLE001
    raise checkpoint.save_error(workdir, pending, e) from None


def train(config, workdir: str, *, list_outputs: bool = True, jobs: Sequence[PeriodicJob] = ()) -> dict[str, Any]:
  """Trains (resuming from the latest good checkpoint in workdir). Returns the last metrics.

  Before anything is written: the config is validated, the workdir locked
  (`ec_dit.training.workdir`), the config compared with the one the workdir's
  checkpoints were saved with, the input and model built and the latest good
  checkpoint restored (if checkpoints exist and none restores, the run stops).
  After a SIGTERM or SIGINT the returned dict also holds `"preempted": True`
  (the run saved a checkpoint at the current step and stopped early).
  A workdir this call created is removed again when the start fails before
  anything was written into it. At the end, `list_outputs` prints the "wrote"
  block (`report.wrote_block`) to stderr. `jobs` run at every eval step and the
  last (`PeriodicJob`; `ec_dit.evaluators.train` passes the sample grids and routing maps).
  """
  tasks.validate(config)
  sources.check_source(config.input)
  is_main = jax.process_index() == 0
  report = _reporter(is_main)
  with preemption_lib.Preemption() as preemption:
    created = is_main and not os.path.exists(workdir)
    os.makedirs(workdir, exist_ok=True)
    lock = _lock(workdir, is_main, report)
    try:
      result = _train(config, workdir, preemption, report, jobs)
    except BaseException:
      if lock is not None:
        lock.release()
        lock = None
      if created:
        _remove_if_empty(workdir)
      raise
    finally:
      if lock is not None:
        lock.release()
  if list_outputs:
    report(report_lib.wrote_block(workdir))
  return result


def _remove_if_empty(workdir: str) -> None:
  """Removes `workdir` when it holds no file (only empty folders): a failed start leaves nothing behind."""
  if not any(files for _, _, files in os.walk(workdir)):
    shutil.rmtree(workdir, ignore_errors=True)


def _train(config, workdir, preemption, report, jobs) -> dict[str, Any]:
  is_main = jax.process_index() == 0
  # -- Checks: the config against the checkpoints' ------------------------
  workdir_lib.check_config(workdir, config, report)

  # -- Input ---------------------------------------------------------------
  tokenize = _tokenize(config)
  dataset = data_pipeline.create_dataset(
      config.input, batch_size=config.batch_size, tokenize=tokenize, seed=config.input.data_seed,
      process_index=jax.process_index(), process_count=jax.process_count(), context_len=config.model.context_len,
      holdout=config.heldout.num_examples)
  data_iter = iter(dataset)

  # -- Mesh, model and optimizer (sharded, abstract first: built once, passed down) ----
  task = tasks.task_for(config)
  mesh = sharding.make_mesh(config.mesh)
  tx = optimizers.make_optimizer(config)
  abstract = state_lib.abstract_state(config, tx, mesh)
  shardings = abstract.shardings
  step_lib.check_batch_split(config, shardings["batch"])
  report(report_lib.model_size_line(config, abstract.ema))
  state, ema = state_lib.init_state(config, tx, abstract)

  # -- Checkpoint: resume from the latest good one (onto this mesh, whatever mesh saved it)
  if is_main:
    workdir_lib.remove_partial_checkpoints(workdir, report)
  manager = checkpoint.make_manager(workdir, keep=config.keep_checkpoints)
  restored = checkpoint.restore_latest_good(manager, abstract.state, abstract.ema, data_iter,
                                           iterator_args=data_pipeline.iterator_restore_args, report=report)
  if restored is not None:
    start, state, ema, data_iter = restored
    report(f"resumed from step {start} in {checkpoint.checkpoint_dir(workdir)}")
  elif is_main:
    workdir_lib.set_aside_old_logs(workdir, report)
  start = int(state["step"])

  # -- Every check passed: now write --------------------------------------
  if is_main:
    workdir_lib.write_config(workdir, config)
  writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)
  train_step = step_lib.make_train_step(config, abstract, tx)
  heldout = heldout_lib.held_out_or_none(config, abstract.graphdef, mesh, tokenize, report)  # ec_dit.training.heldout

  # -- Loop ----------------------------------------------------------------
  metrics: dict[str, Any] = {}
  pending, bad_total, unchecked = None, 0, None
  skip_bad = config.input.skip_bad_examples
  progress = metrics_lib.progress_bar(config.num_train_steps, start, enabled=is_main)
  t_last, steps_since = time.time(), 0
  estimate = report_lib.DurationEstimate(start + 1, config.num_train_steps, report)

  def check_finite(checked_step, checked):  # fail fast, never log, save or sample a non-finite state
    loss = float(checked["loss"])
    if not (np.isfinite(loss) and bool(checked["params_finite"])):
      _finish_saves(manager, workdir, pending)
      progress.close()
      what = f"non-finite loss {loss}" if not np.isfinite(loss) else "non-finite parameters"
      raise FloatingPointError(f"{what} at step {checked_step}; stopping. The last checkpoint "
                               f"(step {manager.latest_step()}) is intact.")

  stop, _ = preemption_lib.agree(preemption.requested)  # a signal before the first step: nothing new to save
  for step in range(start + 1, config.num_train_steps + 1):
    if stop:
      break
    local = dict(next(data_iter))
    bad = int(np.sum(local.pop("bad"))) if "bad" in local else 0
    batch = data_pipeline.global_batch(task.train_batch(config, local), shardings["batch"])
    state, ema, metrics = train_step(state, ema, batch)

    # The previous step is checked now, while this one runs: reading this step's loss would make the host
    # wait for it before fetching the next batch. A step that is logged, saved or sampled is checked first.
    if unchecked is not None:
      check_finite(*unchecked)
    stop, (bad,) = preemption_lib.agree(preemption.requested, bad)
    every = config.eval_every_steps
    grid_due = bool(every) and (step % every == 0 or step == config.num_train_steps)  # and always at the end
    unchecked = (step, metrics)
    if (stop or grid_due or step % config.log_every_steps == 0 or step % config.checkpoint_every_steps == 0
        or step == config.num_train_steps):
      check_finite(*unchecked)
      unchecked = None
    bad_total += bad
    progress.update(1)
    estimate.step(step)
    steps_since += 1
    held = {}
    if heldout is not None and heldout.due(step):  # its time is kept out of steps_per_sec
      t_held = time.time()
      held = heldout.metrics(state["params"], ema)
      held["heldout/seconds"] = time.time() - t_held
      t_last += held["heldout/seconds"]
    if step % config.log_every_steps == 0 or step == config.num_train_steps:
      now = time.time()
      scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
      scalars["steps_per_sec"] = steps_since / max(now - t_last, 1e-9)
      if skip_bad:
        scalars["input/bad_examples"] = bad_total
      t_last, steps_since = now, 0
      writer.write_scalars(step, {**scalars, **held})
      progress.set_postfix(loss=f"{scalars['loss']:.4f}")
    elif held:
      writer.write_scalars(step, held)
    if stop:
      who = preemption.signal_name or "a stop request on another process"
      report(f"{who} at step {step}: saving a checkpoint and exiting")
      pending = _save(manager, workdir, step, state, ema, data_iter, pending, force=True)
      break
    if step % config.checkpoint_every_steps == 0 or step == config.num_train_steps:
      pending = _save(manager, workdir, step, state, ema, data_iter, pending)
    if grid_due and is_main:
      for job in jobs:
        job(step, ema, workdir, writer)
  progress.close()
  _finish_saves(manager, workdir, pending)
  manager.close()
  writer.close()
  if bad_total:
    report(f"skipped {bad_total} bad example(s) (config.input.skip_bad_examples=True), each replaced by the next "
           f"good one; metrics.jsonl counts them as input/bad_examples")
  result: dict[str, Any] = {k: float(v) for k, v in jax.device_get(metrics).items()}
  if stop:
    result["preempted"] = True
  return result


def train_and_evaluate(config, workdir: str, *, jobs: Sequence[PeriodicJob] = (),
                       evaluate: Callable[[str], Any] | None = None) -> dict[str, Any]:
  """Trains (with `jobs`), then runs `evaluate(workdir)` and prints the "wrote" block; returns what
  `evaluate` returns (the GenEval scores, from `ec_dit.evaluators.train_and_evaluate`), or the last
  training metrics when it returns None or none is given.

  A preempted run (SIGTERM) exits after its checkpoint instead: scoring a half-trained
  model would take minutes the VM does not have and print a score for the wrong run.
  Rerunning the same command resumes training and then evaluates.
  """
  result = train(config, workdir, list_outputs=False, jobs=jobs)
  report = _reporter(jax.process_index() == 0)
  if result.get("preempted"):
    report(report_lib.wrote_block(workdir))
    return result
  scores = None if evaluate is None else evaluate(workdir)
  report(report_lib.wrote_block(workdir))
  return result if scores is None else scores
