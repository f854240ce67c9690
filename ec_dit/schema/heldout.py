"""The held-out loss's part of the schema (`config.heldout`): defaults and validation.

The held-out loss itself is `ec_dit.training.heldout`. Like the rest of
`ec_dit.schema`, this module imports nothing else from `ec_dit`.
"""

from __future__ import annotations

import ml_collections

from ec_dit.schema.checks import fail, is_int, is_number


def heldout_defaults() -> ml_collections.ConfigDict:
  """The `config.heldout` section: a loss on examples training never draws, at fixed t and fixed noise.

  Fields:
    every_steps: log it every this many steps (and at the last step); 0 = never.
    num_examples: held-out examples: ShapesWorld indices [num_examples, num_examples + this) of the
      training seed (past the training source); other sources: their last min(this, length // 10)
      records, left out of training.
    batch_size: examples per evaluated batch; 0 = config.batch_size (so batch-level routing groups
      see batches of the training size).
    t_values: the fixed grid of times t (1 = pure noise) the loss is averaged over.
    seed: the fixed noise (and latent draws) of every example and t.
  """
  return ml_collections.ConfigDict(dict(
      every_steps=500, num_examples=256, batch_size=0, t_values=(0.1, 0.3, 0.5, 0.7, 0.9), seed=0,
  ))


def validate_heldout(config) -> None:
  """Checks `config.heldout`; raises ValueError naming the first bad field."""
  h = config.heldout
  for name, low in (("every_steps", 0), ("num_examples", 1), ("batch_size", 0), ("seed", 0)):
    if not (is_int(h[name]) and h[name] >= low):
      fail(f"heldout.{name}", f"an integer >= {low}", h[name])
  t = h.t_values
  ok = (not isinstance(t, (str, bytes)) and hasattr(t, "__len__") and len(t) > 0
        and all(is_number(v) and 0.0 < v <= 1.0 for v in t))
  if not ok:
    fail("heldout.t_values", "a non-empty list of numbers in (0, 1]", t)
