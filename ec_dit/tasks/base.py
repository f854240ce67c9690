"""The `Task` interface: everything that differs between model families, behind one set of methods.

A task is the one object that knows a family (text-to-image EC-DiT, class-conditional
DiT-MoE, ...). Training, checkpoints, sampling, prepare and the tools ask it instead of
testing `config.model.arch`; `ec_dit.tasks.task_for(config)` is the one place that maps
the arch name to a task. A task is stateless: every method takes the config.

    task = tasks.task_for(config)
    model = task.build_model(config)                  # initialised, training mode
    abstract = task.abstract_params(config)           # checkpoint targets, no memory
    batch = task.train_batch(config, next(data_iter)) # host batch -> what the step feeds
    inputs = task.model_inputs(config, batch, key)    # inside the jitted step
    loss, aux = task.loss(config, model, inputs, key)

Tasks sit above the model, the diffusion processes and the schema, below training,
inference and the command line.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# The conditioning kinds a task may take (`Task.conditioning`).
TEXT, CLASS_LABEL = "text", "class_label"

LATENT_KEY = 1  # folded into a step's key for its latent draws; the loss splits the step key itself


def draw_latents(batch: dict, key: jax.Array) -> jax.Array:
  """The images a step trains on: `batch["image"]` (pixels, or latents given directly), or for prepared
  latents a fresh draw latent_mean + latent_std * eps, eps from fold_in(step key, LATENT_KEY), so a
  resumed run draws the same. Every task's `model_inputs` uses it."""
  if "latent_mean" not in batch:
    return batch["image"]
  eps = jax.random.normal(jax.random.fold_in(key, LATENT_KEY), batch["latent_mean"].shape, jnp.float32)
  return batch["latent_mean"] + batch["latent_std"] * eps


class Task(abc.ABC):
  """One model family: its model, batches, loss, held-out loss and sampling conditioning.

  Class attributes:
    arch: the `config.model.arch` value that selects this task.
    conditioning: what a sample is conditioned on, `TEXT` (prompts) or `CLASS_LABEL`.
    needs_text_encoder: whether examples carry captions (tokenized, or encoded by T5 when prepared).
    model_sections: the `config.model` sub-sections only this family reads.
    metric_keys: the loss's aux entries the train step logs beside the loss.
    ffn_blocks: where the per-block FFN parameters live, (path to the blocks dict, the FFN's key in a
      block), for `ec_dit.upcycle`.
  """

  arch: ClassVar[str]
  conditioning: ClassVar[str]
  needs_text_encoder: ClassVar[bool]
  model_sections: ClassVar[tuple[str, ...]] = ()
  metric_keys: ClassVar[tuple[str, ...]] = ("mse", "aux_loss")
  ffn_blocks: ClassVar[tuple[tuple[str, ...], str]]

  # -- Config -----------------------------------------------------------------
  def validate(self, config) -> None:
    """The family's checks across config sections, after `schema.validate` (`ec_dit.tasks.validate` runs
    both); raises ValueError naming the first bad field."""

  # -- Model ------------------------------------------------------------------
  @abc.abstractmethod
  def build_model(self, config, *, seed: int | None = None) -> nnx.Module:
    """The family's network, initialised from `seed` (default `config.seed`), in training mode."""

  @abc.abstractmethod
  def abstract_model(self, config, *, seed: int = 0) -> nnx.Module:
    """The network with ShapeDtypeStructs in place of arrays (no memory allocated)."""

  def abstract_denoiser(self, config) -> nnx.Module:
    """The diffusion network alone (no text encoder), abstract: what `ec_dit.tools.model_summary` counts."""
    return self.abstract_model(config)

  def abstract_params(self, config) -> dict:
    """ShapeDtypeStructs of the network's parameters as a pure dict (checkpoint targets)."""
    return nnx.to_pure_dict(nnx.state(self.abstract_model(config), nnx.Param))

  def check_upcyclable(self, config) -> None:
    """Raises ValueError naming the field when `ec_dit.upcycle` cannot turn this config's dense FFNs into MoEs."""

  # -- Training -----------------------------------------------------------------
  def check_source(self, config) -> None:
    """Raises ValueError naming `config.input.source` when this family cannot train on it."""

  def train_batch(self, config, local: dict) -> dict:
    """This process's host batch as the train step takes it (checked; unused fields dropped)."""
    return local

  @abc.abstractmethod
  def abstract_batch(self, config, batch_sharding) -> dict:
    """ShapeDtypeStructs (with `batch_sharding`) of one global batch as the train step takes it."""

  @abc.abstractmethod
  def model_inputs(self, config, batch: dict, key: jax.Array) -> dict:
    """Inside the step, outside the gradient: the model's inputs from a device batch (latents drawn)."""

  @abc.abstractmethod
  def loss(self, config, model, inputs: dict, key: jax.Array) -> tuple[jax.Array, dict[str, Any]]:
    """(loss, aux) of `model` on `model_inputs`; aux holds `metric_keys` and "moe" (router diagnostics)."""

  # -- Sampling ---------------------------------------------------------------------
  @abc.abstractmethod
  def null_conditioning(self, config) -> Any:
    """The conditioning of an unconditional sample (the empty prompt, the null class): pads a batch."""

  @abc.abstractmethod
  def sample(self, config, model, conditioning, keys: jax.Array, *, image_shape, **settings) -> jax.Array:
    """Inside the pipeline's jit: samples [B, *image_shape] of `model` (evaluation mode) for a batch's
    `conditioning` (a pytree the front end builds), one noise key per image, the sampler's `settings`."""

  @abc.abstractmethod
  def decode(self, config, samples, decoder=None) -> np.ndarray:
    """Samples in the model's space -> what a pipeline returns: uint8 images [B, H, W, 3] through `decoder`
    (`FrozenEncoders` with a VAE) for latents; without one, pixels as uint8 or latents as float32."""

  # -- Held-out loss --------------------------------------------------------------
  @abc.abstractmethod
  def heldout_keys(self, examples: dict) -> tuple[str, ...]:
    """The fields of the held-out examples (latents already drawn into "image") the held-out loss reads."""

  @abc.abstractmethod
  def heldout_loss(self, config):
    """`one_t(model, batch, noise, t) -> per-example loss [B]` at one t of the held-out grid (a fixed t)."""
