"""The one sampling pipeline core: a run's weights, its task's sampler and decoder, in fixed-size jitted batches.

`TextToImagePipeline` (`ec_dit.inference`: prompts) and `ClassToImagePipeline`
(`ec_dit.inference.class_to_image`: class labels) are thin front ends of `SamplingPipeline`:
each turns its inputs into the task's conditioning and per-image noise keys, and the
core does the rest, the same way for every task (`ec_dit.tasks`):

* the model, built abstract in evaluation mode from the task, merged with `params`;
* `_sample`, jitted once per batch size and sampler settings: `task.sample(...)`;
* `_generate`: items in batches of `batch_size`, the last padded with the task's null
  conditioning (so any number of items compiles once), each batch decoded by `decode`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ec_dit import checkpoint, configs, tasks


def base_key(generator) -> jax.Array:
  """The noise key of a `generator`: an int seed, a JAX key (typed, or raw uint32 [2] from `jax.random.PRNGKey`)."""
  if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
    return jax.random.key(int(generator))
  if isinstance(generator, (jax.Array, np.ndarray)):
    if jnp.issubdtype(generator.dtype, jax.dtypes.prng_key) and generator.shape == ():
      return generator
    if generator.dtype == np.uint32 and generator.shape == (2,):
      return jax.random.wrap_key_data(jnp.asarray(generator))
  raise ValueError(f"generator must be an int seed or a single JAX key, got {type(generator).__name__} "
                   f"{getattr(generator, 'shape', '')}")


def restore_run(workdir: str, *, step: int | None = None, encoders_config=None):
  """(config, EMA params) of a run's latest (or given) checkpoint; `encoders_config` (a `config.encoders`
  section) replaces the run's encoder paths, e.g. when the checkpoints now sit elsewhere."""
  config = configs.from_run(workdir)
  if encoders_config is not None:
    config.encoders = encoders_config
  return config, checkpoint.restore_ema(workdir, tasks.task_for(config).abstract_params(config), step=step)


class SamplingPipeline:
  """The sampling core every front end shares (see the module docstring).

  Args:
    config: the run's config; its task (`tasks.task_for`) must take `conditioning`
      (the front end's class attribute).
    params: the model parameters (a pure dict, normally the EMA weights).
    batch_size: images per jitted call.
  """

  conditioning: str  # the front end's conditioning kind (tasks.TEXT, tasks.CLASS_LABEL)

  def __init__(self, config, params, *, batch_size: int = 16):
    self.task = tasks.task_for(config)
    if self.task.conditioning != self.conditioning:
      raise ValueError(f"config.model.arch={self.task.arch!r} samples from {self.task.conditioning} conditioning; "
                       f"{type(self).__name__} needs a model conditioned on {self.conditioning}")
    self.config, self.params, self.batch_size = config, params, batch_size
    abstract = self.task.abstract_model(config)
    abstract.eval()  # evaluation capacity factor for expert choice; no balance loss
    self._graphdef, _ = nnx.split(abstract, nnx.Param)
    m = config.model
    self.image_shape = (m.input_size, m.input_size, m.in_channels)

  def __hash__(self):  # jit treats `self` as static
    return id(self)

  @functools.partial(jax.jit, static_argnums=(0, 4))
  def _sample(self, params, conditioning, keys, settings: tuple):
    model = nnx.merge(self._graphdef, params)
    return self.task.sample(self.config, model, conditioning, keys, image_shape=self.image_shape, **dict(settings))

  def _generate(self, items: Sequence[Any], keys: Sequence[jax.Array], settings: dict[str, Any],
                condition: Callable, decode: Callable) -> list:
    """`decode(samples)` of each batch of `items`, in order.

    `keys[i]` is item i's noise key; `condition(items, keys [batch_size])` gives the
    task's (conditioning, sampler keys) of one padded batch; `settings` are the
    task sampler's static keyword arguments.
    """
    null, static = self.task.null_conditioning(self.config), tuple(sorted(settings.items()))
    out = []
    for start in range(0, len(items), self.batch_size):
      chunk = list(items[start:start + self.batch_size])
      pad = self.batch_size - len(chunk)
      conditioning, batch_keys = condition(chunk + [null] * pad,
                                           jnp.stack(list(keys[start:start + len(chunk)]) + [jax.random.key(0)] * pad))
      samples = self._sample(self.params, conditioning, batch_keys, static)
      out.append(decode(samples[:len(chunk)]))
    return out
