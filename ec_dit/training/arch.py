"""The one dispatch point of training on `config.model.arch`: which state, step and batch a run uses.

    steps = arch.steps_for(config)          # (train_state_shardings, init_state, make_train_step)
    graphdef, state, ema = steps.init_state(config, tx, mesh)
    batch = arch.train_batch(config, next(data_iter))

"ec_dit" (text-to-image) uses `ec_dit.training.state` and `ec_dit.training.step`;
"dit_moe" (class-conditional) uses `ec_dit.training.class_cond`, which trains on
prepared latents with class labels (`config.input.source = "latents:DIR"` of an
ImageNet-style folder of class subfolders).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from ec_dit import schema
from ec_dit.model import is_class_cond
from ec_dit.training import class_cond, state as state_lib, step as step_lib

# The prepared-latent fields the class-conditional step reads (the T5 features and mask are not used).
CLASS_COND_KEYS = ("latent_mean", "latent_std", "label")


class Steps(NamedTuple):
  """The functions of one architecture's training (same signatures for every arch)."""
  train_state_shardings: Callable
  init_state: Callable
  make_train_step: Callable


def steps_for(config) -> Steps:
  """The (train_state_shardings, init_state, make_train_step) of `config.model.arch`."""
  if is_class_cond(config):
    return Steps(class_cond.train_state_shardings, class_cond.init_state, class_cond.make_train_step)
  return Steps(state_lib.train_state_shardings, state_lib.init_state, step_lib.make_train_step)


def check_class_cond_source(config) -> None:
  """A class-conditional run trains on prepared latents with labels: a ValueError naming the field otherwise."""
  kind, _ = schema.parse_source(config.input.source)
  if kind != "latents":
    raise ValueError(f"config.input.source: model.arch='dit_moe' trains on prepared latents with class labels, "
                     f"'latents:DIR' (a folder written by `python -m ec_dit.prepare` from ImageNet-style class "
                     f"subfolders; docs/dit_moe.md), got {config.input.source!r}")


def train_batch(config, local: dict) -> dict:
  """This process's batch as the arch's step takes it; for "dit_moe" only the latents and labels, checked.

  Raises ValueError when a label is missing (-1: the folder was not prepared from
  class subfolders) or outside [0, config.model.class_cond.num_classes).
  """
  if not is_class_cond(config):
    return local
  labels = np.asarray(local["label"])
  n = config.model.class_cond.num_classes
  if (labels < 0).any():
    raise ValueError(f"config.input.source={config.input.source!r}: examples without a class label (-1); a "
                     f"class-conditional run needs data prepared from class subfolders (DIR/<class>/*.png)")
  if (labels >= n).any():
    raise ValueError(f"config.model.class_cond.num_classes={n}: the data has label {int(labels.max())}; labels "
                     f"must be in [0, {n})")
  return {k: local[k] for k in CLASS_COND_KEYS}
