"""Training and evaluation: `train_and_evaluate(config, workdir)`.

The loop reads top to bottom in lifecycle order: workdir and config, input,
model and optimizer, checkpoint (resume), train step, evals, loop, final
GenEval. The training state is a pure pytree of arrays,
{"step", "params", "opt_state"} plus the EMA weights, so that Orbax saves and
restores it exactly and a resumed run's losses equal an uninterrupted run's
bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ec_dit import checkpoint, config_lib, diffusion, input_pipeline, metrics_writer, model as model_lib, muon, text
from ec_dit import sharding


# ----------------------------------------------------------------------------
# Optimizer and training state

def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW (or Muon + AdamW) with linear warmup and cosine decay to 10%, after global-norm clipping."""
  warmup = min(config.warmup_steps, max(config.num_train_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
      decay_steps=max(config.num_train_steps, warmup + 1), end_value=0.1 * config.learning_rate)
  update = optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2, weight_decay=config.weight_decay)
  if config.optimizer == "muon":  # AdamW stays for the parameters Muon does not take
    update = muon.muon_adamw(schedule, update, beta=config.muon.beta, ns_steps=config.muon.ns_steps,
                             experts=config.muon.experts, weight_decay=config.weight_decay)
  return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), update)


def init_model(config):
  """(graphdef of the model in training mode, initial params as a pure dict)."""
  model = model_lib.TextToImage(config, rngs=nnx.Rngs(config.seed))
  graphdef, params = nnx.split(model, nnx.Param)
  return graphdef, nnx.to_pure_dict(params)


def init_state(config, tx, mesh=None):
  """(graphdef, state, ema), sharded over `mesh` (default: the config's mesh over all devices).

  Abstract first: shapes and shardings come from `nnx.eval_shape`, then one
  jitted initialisation writes each device's shards directly (out_shardings),
  so no host ever holds a full copy of the weights.
  """
  mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
  graphdef, _, _, shardings = sharding.train_state_shardings(config, tx, mesh)

  def init():
    _, params = init_model(config)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

  state = jax.jit(init, out_shardings=shardings["state"])()
  ema = jax.tree.map(jnp.copy, state["params"])  # its own buffers (both are donated to the step)
  return graphdef, state, ema


def ema_decay(config, step):
  """EMA decay with warm-up: short runs are not dominated by the initial weights."""
  return jnp.minimum(config.ema_decay, (1.0 + step) / (10.0 + step))


def summarize_diagnostics(moe: dict) -> dict[str, jax.Array]:
  """Per-layer scalar router diagnostics for logging."""
  out = {}
  for layer, d in moe.items():
    counts = d["experts_per_token"]
    out[f"moe/{layer}/experts_per_token_mean"] = jnp.mean(counts)
    out[f"moe/{layer}/experts_per_token_std"] = jnp.std(counts)
    out[f"moe/{layer}/experts_per_token_max"] = jnp.max(counts)
    out[f"moe/{layer}/dropped_fraction"] = d["dropped_fraction"]
    out[f"moe/{layer}/mean_top_gate"] = d["mean_top_gate"]
    out[f"moe/{layer}/router_z_loss"] = d["router_z_loss"]
    out[f"moe/{layer}/expert_usage_max"] = jnp.max(d["expert_usage"])
    if "balance_loss" in d:
      out[f"moe/{layer}/balance_loss"] = d["balance_loss"]
  return out


def make_train_step(config, graphdef, tx, mesh=None):
  """The jitted update: loss, gradients, optimizer (config.optimizer), EMA; state and EMA buffers are donated.

  Jitted with explicit in/out shardings on `mesh` (default: the config's mesh):
  state and EMA by the parameters' logical axes, the batch over the `batch`
  rule's axes, metrics replicated. The MoE layers' activation constraints are
  active while the step is traced.
  """
  d = config.diffusion
  mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
  _, _, _, shardings = sharding.train_state_shardings(config, tx, mesh)

  def train_step(state, ema, batch):
    with sharding.activation_sharding(mesh, config.mesh.rules):
      return _train_step(state, ema, batch)

  def _train_step(state, ema, batch):
    key = jax.random.fold_in(jax.random.key(config.seed), state["step"])

    def loss_fn(params):
      model = nnx.merge(graphdef, params)
      return diffusion.rectified_flow_loss(model, batch["image"], batch["tokens"], batch["mask"], key,
                                           t_mean=d.t_mean, t_std=d.t_std, uncond_prob=d.uncond_prob,
                                           loss_t_min=d.loss_t_min)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    decay = ema_decay(config, state["step"])
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
    params_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
    metrics = {"loss": loss, "mse": aux["mse"], "aux_loss": aux["aux_loss"], "params_finite": params_finite,
               "grad_norm": optax.global_norm(grads), **summarize_diagnostics(aux["moe"])}
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, ema, metrics

  return jax.jit(train_step, donate_argnums=(0, 1),
                 in_shardings=(shardings["state"], shardings["ema"], shardings["batch"]),
                 out_shardings=(shardings["state"], shardings["ema"], sharding.replicated(mesh)))


def _check_batch_split(config, batch_sharding):
  """With several processes each feeds its own rows, so the batch must be split across all of them."""
  if jax.process_count() == 1:
    return
  spec = batch_sharding.spec
  axes = () if not len(spec) or spec[0] is None else (spec[0],) if isinstance(spec[0], str) else spec[0]
  split = int(np.prod([batch_sharding.mesh.shape[a] for a in axes]))
  if split % jax.process_count():
    raise ValueError(f"config.batch_size={config.batch_size} cannot be split over the mesh's batch axes "
                     f"{dict(batch_sharding.mesh.shape)} across {jax.process_count()} processes: make it a "
                     f"multiple of the product of the batch axes")


# ----------------------------------------------------------------------------
# Preemption

class _Preemption:
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
# Evals

GRID_IMAGES_PER_PROMPT = 4


def sample_grid_pipeline(config):
  """The pipeline for the periodic sample grids: built once per run, so the sampler compiles once."""
  from ec_dit.pipeline import TextToImagePipeline
  params = checkpoint.abstract_params(config)  # replaced by the EMA weights before every use
  return TextToImagePipeline(config, params, batch_size=len(config.sample.prompts) * GRID_IMAGES_PER_PROMPT)


def write_sample_grid(config, pipe, ema, workdir: str, step: int, writer) -> str:
  """Samples the config's fixed prompts with the EMA weights and writes a PNG grid."""
  from ec_dit.geneval import layout
  n = GRID_IMAGES_PER_PROMPT
  pipe.params = ema
  images = pipe.generate(list(config.sample.prompts), num_images_per_prompt=n, seed=config.sample.seed)
  grid = layout.make_grid(list(images), cols=n)
  path = os.path.join(workdir, "samples", f"step_{step:07d}.png")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  layout.save_png(grid, path)
  writer.write_image(step, "samples", grid)
  return path


# ----------------------------------------------------------------------------
# The loop

def train(config, workdir: str) -> dict[str, Any]:
  """Trains (resuming from the latest good checkpoint in workdir). Returns the last metrics.

  After a SIGTERM the returned dict also holds `"preempted": True` (the run saved a
  checkpoint at the current step and stopped early).
  """
  # -- Workdir and config --------------------------------------------------
  config_lib.validate(config)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config.to_dict(), f, indent=2, default=list)
  writer = metrics_writer.MetricsWriter(workdir, enabled=is_main)

  # -- Input ---------------------------------------------------------------
  tokenizer = text.tokenizer_from_config(config)
  dataset = input_pipeline.create_dataset(
      config.input, batch_size=config.batch_size, tokenize=tokenizer.encode, seed=config.input.data_seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  data_iter = iter(dataset)

  # -- Mesh, model and optimizer (sharded, abstract first) ----------------
  mesh = sharding.make_mesh(config.mesh)
  tx = make_optimizer(config)
  _, abstract_state, abstract_ema, shardings = sharding.train_state_shardings(config, tx, mesh)
  _check_batch_split(config, shardings["batch"])
  graphdef, state, ema = init_state(config, tx, mesh)

  # -- Checkpoint: resume from the latest good one (onto this mesh, whatever mesh saved it)
  manager = checkpoint.make_manager(workdir, keep=config.keep_checkpoints)
  restored = checkpoint.restore_latest_good(manager, abstract_state, abstract_ema, data_iter, report=writer.message)
  if restored is not None:
    start, state, ema, data_iter = restored
    writer.message(f"resumed from step {start} in {checkpoint.checkpoint_dir(workdir)}")
  start = int(state["step"])

  # -- Step ----------------------------------------------------------------
  train_step = make_train_step(config, graphdef, tx)

  # -- Loop ----------------------------------------------------------------
  metrics: dict[str, Any] = {}
  grid_pipe = None
  progress = metrics_writer.progress_bar(config.num_train_steps, start, enabled=is_main)
  t_last, steps_since = time.time(), 0
  with _Preemption() as preemption:
    for step in range(start + 1, config.num_train_steps + 1):
      batch = input_pipeline.global_batch(next(data_iter), shardings["batch"])
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


def evaluate(config, workdir: str) -> dict[str, Any]:
  """Generates the ShapesWorld GenEval-style prompt set into workdir/geneval and scores it.

  Prints the harness's table with its JSON line last and returns the summary.
  """
  from ec_dit.geneval import harness, prompts as prompts_lib, summary as summary_lib
  from ec_dit.pipeline import TextToImagePipeline
  g = config.geneval
  out = os.path.join(workdir, "geneval")
  suite = prompts_lib.suite_from_config(g)
  os.makedirs(out, exist_ok=True)
  prompts_lib.write_prompts(suite, os.path.join(out, "prompts.jsonl"))
  pipe = TextToImagePipeline.from_run(workdir, batch_size=g.batch_size)
  # The sampler settings come from the config given now (the run's weights and model from its workdir),
  # so `--mode=evaluate --config.sample.guidance_scale=...` compares samplers on one run.
  generate_into(pipe, suite, os.path.join(out, "images"), n=g.images_per_prompt, seed=config.sample.seed,
                sample=config.sample)
  rows = harness.evaluate_images(os.path.join(out, "images"), os.path.join(out, "results.jsonl"))
  scores = summary_lib.summarize(rows)
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(scores, f, indent=2)
  print(summary_lib.format_summary(scores), flush=True)
  return scores


def generate_into(pipe, prompts: list[dict], out_dir: str, *, n: int = 4, seed: int = 0, progress: bool = True,
                  sample=None):
  """Writes n samples per GenEval prompt in GenEval's folder layout.

  `sample` (a config.sample section) overrides the pipeline's sampler, steps and guidance settings.
  """
  from tqdm import tqdm
  from ec_dit.geneval import layout
  from ec_dit.pipeline import sampler_settings
  kwargs = {} if sample is None else sampler_settings(sample)
  texts = [p["prompt"] for p in prompts]
  per_call = max(1, pipe.batch_size // n)
  with tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress) as bar:
    for start in range(0, len(prompts), per_call):
      images = pipe.generate(texts[start:start + per_call], num_images_per_prompt=n, seed=seed, first_index=start,
                             **kwargs)
      for i, meta in enumerate(prompts[start:start + per_call]):
        layout.write_prompt_folder(out_dir, start + i, meta, list(images[i * n:(i + 1) * n]))
      bar.update(len(images) // n)
  if prompts:
    first = [layout.load_image(os.path.join(layout.prompt_dir(out_dir, i), "grid.png"))
             for i in range(min(len(prompts), 16))]
    widths = {im.shape for im in first}
    if len(widths) == 1:
      layout.save_png(layout.make_grid(first, cols=1), os.path.join(out_dir, "grid.png"))


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains, then generates the GenEval-style prompt set and prints the score table.

  A preempted run (SIGTERM) exits after its checkpoint instead: scoring a half-trained
  model would take minutes the VM does not have and print a score for the wrong run.
  Rerunning the same command resumes training and then evaluates.
  """
  result = train(config, workdir)
  if result.get("preempted"):
    return result
  return evaluate(config, workdir)


def sample_to_files(workdir: str, prompts: list[str], *, num_images: int = 4, seed: int = 0) -> list[str]:
  """Writes PNGs for prompts from the run's latest checkpoint; returns their paths."""
  import re
  from ec_dit.geneval import layout
  from ec_dit.pipeline import TextToImagePipeline
  pipe = TextToImagePipeline.from_run(workdir, batch_size=max(1, min(64, len(prompts) * num_images)))
  images = pipe.generate(prompts, num_images_per_prompt=num_images, seed=seed)
  out_dir = os.path.join(workdir, "samples")
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for i, prompt in enumerate(prompts):
    slug = re.sub(r"[^\w]+", "_", prompt.lower()).strip("_")[:60] or "unconditional"
    for j in range(num_images):
      path = os.path.join(out_dir, f"{slug}_{seed}_{j}.png")
      layout.save_png(images[i * num_images + j], path)
      paths.append(path)
  return paths
