"""The held-out loss: the training objective on examples training never draws, at fixed t and fixed noise.

`config.heldout` (`ec_dit.schema.heldout_defaults`) names a fixed evaluation set
(`ec_dit.data.pipeline.held_out_examples`: ShapesWorld indices past
`config.input.num_examples` of the training seed; for other sources their last
records, which training leaves out), a fixed grid of times `t_values` and fixed
noise drawn once from `seed`. Its value is a function of the parameters alone:
the same parameters give the same bits, whatever step, resume or batch of
training came before. It is the primary metric of the router comparison
(`experiments/compare_routers.py`): a training batch's loss is one noisy draw of
examples and t, this is the same 256 examples x 5 t every time.

The loss per t is the training loss at that t without its random parts, text
always given, no auxiliary losses:

* text-to-image: the velocity MSE weighted by `diffusion.loss_weight(t, loss_t_min)`;
* class-conditional (`model.arch = "dit_moe"`): rectified flow's MSE on eps - x0,
  or for DDPM the MSE + VB term at timestep round(t * (num_timesteps - 1));
* text-to-image DDPM (`model.prediction = "epsilon"`, PixArt-alpha): that MSE + VB term too.

Prepared latents are drawn once (latent_mean + latent_std * eps, eps fixed).
`heldout/loss` (the training parameters) and `heldout/loss_ema` (the EMA weights,
the ones that sample) are the means over the t grid; `heldout/ema_t{t}` the
EMA's loss at each t. One jitted function serves every batch, t and weights.

    held = HeldOut(config, graphdef, mesh, tokenize)      # or None: held_out_or_none
    if held.due(step): writer.write_scalars(step, held.metrics(state["params"], ema))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ec_dit import sharding, tasks
from ec_dit.data import pipeline as data_pipeline

NOISE_KEY, LATENT_KEY = 0, 1  # folded into the held-out seed's key


def held_out_or_none(config, graphdef, mesh, tokenize, report=print) -> "HeldOut | None":
  """The run's held-out loss, or None when `config.heldout.every_steps` is 0 or the source is too small to hold
  any record out (fewer than 10 records: a tenth at most is held out); `report` says so in one line."""
  if not config.heldout.every_steps:
    return None
  examples = _examples(config, tokenize)
  if not examples:
    report(f"held-out loss off: {config.input.source} is too small to hold records out of training "
           f"(at most a tenth is held out)")
    return None
  return HeldOut(config, graphdef, mesh, tokenize, examples=examples)


def _examples(config, tokenize) -> dict:
  return data_pipeline.held_out_examples(config.input, config.heldout.num_examples, tokenize=tokenize,
                                         context_len=config.model.context_len)


class HeldOut:
  """The fixed held-out set of a run and its jitted loss (see the module docstring).

  `examples`: the held-out examples when the caller already decoded them
  (`data.pipeline.held_out_examples`); None decodes them here.
  """

  def __init__(self, config, graphdef, mesh, tokenize, examples: dict | None = None):
    h = config.heldout
    self.config, self.every_steps = config, int(h.every_steps)
    self.t_values = tuple(float(t) for t in h.t_values)
    examples = dict(_examples(config, tokenize) if examples is None else examples)
    if not examples:
      raise ValueError(f"config.input.source: {config.input.source!r} has too few records to hold any out "
                       f"(config.heldout.num_examples={h.num_examples}; at most a tenth of a source is held out)")
    n = len(next(iter(examples.values())))
    self.batch_size = min(int(h.batch_size or config.batch_size), n)
    key = jax.random.key(h.seed)
    if "latent_mean" in examples:
      eps = np.asarray(jax.random.normal(jax.random.fold_in(key, LATENT_KEY), examples["latent_mean"].shape))
      examples["image"] = examples.pop("latent_mean") + examples.pop("latent_std") * eps
    self.num_examples = n
    shape = examples["image"].shape
    noise = np.asarray(jax.random.normal(jax.random.fold_in(key, NOISE_KEY), (len(self.t_values),) + shape))
    # Batches of batch_size in example order; the last one is filled up with the first examples, masked out.
    pad = (-n) % self.batch_size
    take = np.concatenate([np.arange(n), np.arange(pad) % n])
    self.weights = np.concatenate([np.ones(n), np.zeros(pad)]).reshape(-1, self.batch_size)
    keys = tasks.task_for(config).heldout_keys(examples)
    self.batches = [{k: examples[k][take[i:i + self.batch_size]] for k in keys}
                    for i in range(0, len(take), self.batch_size)]
    self.noise = [noise[:, take[i:i + self.batch_size]] for i in range(0, len(take), self.batch_size)]
    self._losses = _make_losses(config, graphdef, mesh, self.t_values)

  def due(self, step: int) -> bool:
    """True at every `every_steps`-th step and at the run's last step."""
    return step % self.every_steps == 0 or step == self.config.num_train_steps

  def per_t(self, params) -> np.ndarray:
    """The mean loss over the held-out examples at each t of the grid: float64 [len(t_values)]."""
    total = np.zeros(len(self.t_values))
    for batch, noise, w in zip(self.batches, self.noise, self.weights):
      per_example = np.asarray(jax.device_get(self._losses(params, batch, noise)), np.float64)  # [T, B]
      total += per_example @ w
    return total / self.num_examples

  def loss(self, params) -> float:
    """The held-out loss: the mean over the t grid of `per_t`."""
    return float(np.mean(self.per_t(params)))

  def metrics(self, params, ema) -> dict[str, float]:
    """{"heldout/loss", "heldout/loss_ema", "heldout/ema_t{t}" ...} for metrics.jsonl and TensorBoard."""
    ema_t = self.per_t(ema)
    out = {"heldout/loss": self.loss(params), "heldout/loss_ema": float(np.mean(ema_t))}
    out.update({f"heldout/ema_t{t:g}": float(v) for t, v in zip(self.t_values, ema_t)})
    return out


def _make_losses(config, graphdef, mesh, t_values):
  """jit(params, batch, noise [T, B, ...]) -> per-example losses [T, B] at each t of the grid (the task's loss)."""
  one_t = tasks.task_for(config).heldout_loss(config)

  def losses(params, batch, noise):
    with sharding.activation_sharding(mesh, config.mesh.rules):
      model = nnx.merge(graphdef, params)
      return jnp.stack([one_t(model, batch, noise[k], t) for k, t in enumerate(t_values)])

  return jax.jit(losses, out_shardings=sharding.replicated(mesh))  # every process reads all of it
