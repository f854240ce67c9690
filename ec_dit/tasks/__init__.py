"""The task registry: the one module that maps `config.model.arch` to a `Task` (`ec_dit.tasks.base`).

    from ec_dit import tasks
    task = tasks.task_for(config)      # TextToImageTask for "ec_dit", ClassConditionalTask for "dit_moe"

Every other module asks the task (its model, batches, loss, conditioning) instead of
testing the arch name. A new family is one `Task` subclass and one entry in `TASKS`.
"""

from __future__ import annotations

from ec_dit import schema
from ec_dit.tasks.base import CLASS_LABEL, TEXT, Task, draw_latents
from ec_dit.tasks.class_conditional import ClassConditionalTask
from ec_dit.tasks.text_to_image import TextToImageTask

__all__ = ["CLASS_LABEL", "TASKS", "TEXT", "Task", "task_for", "draw_latents", "validate"]

# Keyed by `config.model.arch`.
TASKS: dict[str, Task] = {t.arch: t for t in (TextToImageTask(), ClassConditionalTask())}


def task_for(config) -> Task:
  """The task of `config.model.arch`; ValueError naming the field for an unknown arch."""
  arch = config.model.get("arch", "ec_dit")
  if arch not in TASKS:
    raise ValueError(f"config.model.arch: must be one of {tuple(TASKS)}, got {arch!r}")
  return TASKS[arch]


def validate(config) -> None:
  """The whole check of a config: the schema's (`ec_dit.schema.validate`: every field against its type and
  range), then its task's (`Task.validate`: the rules of its model family). ValueError naming the first bad
  field, `config.model.arch` for an unknown family."""
  schema.validate(config)
  task_for(config).validate(config)
