"""The task interface: one registry maps `config.model.arch` to a task, and training builds the abstract
state once per run (the loop, the step, checkpoints and held-out loss receive it)."""

import pytest

from ec_dit import schema, tasks
from ec_dit.tasks import class_conditional, text_to_image
from ec_dit.training import loop, state as state_lib
from helpers import load_config, train_config


def test_the_registry_maps_each_arch_to_its_task():
  for arch, task in tasks.TASKS.items():
    assert task.arch == arch and task.needs_text_encoder == (task.conditioning == tasks.TEXT)
  config = schema.base_config()
  assert isinstance(tasks.task_for(config), text_to_image.TextToImageTask)
  config.model.arch = "dit_moe"
  assert isinstance(tasks.task_for(config), class_conditional.ClassConditionalTask)
  config.model.arch = "unet"
  schema.validate(config)  # the schema does not read the family: the registry does
  for check in (tasks.task_for, tasks.validate):
    with pytest.raises(ValueError, match=r"config.model.arch: must be one of \('ec_dit', 'dit_moe'\), got 'unet'"):
      check(config)


def test_family_rules_are_the_tasks():
  """`tasks.validate` = the schema's field checks, then the task's rules across sections."""
  config = load_config("dit_moe", "S-8E2A")
  config.model.ffn.activation = "gelu"  # a valid activation, but DiT-MoE's experts are SwiGLU
  schema.validate(config)
  with pytest.raises(ValueError, match="config.model.ffn.activation: must be 'swiglu' with model.arch='dit_moe'"):
    tasks.validate(config)
  config = train_config(input__source="latents:/nonexistent", text__encoder="trainable")
  with pytest.raises(ValueError, match="config.text.encoder: must be 't5' for a 'latents:DIR' source"):
    tasks.validate(config)
  config = load_config("dit_moe", "S-8E2A")  # class-conditional: its latents carry labels, no text
  config.input.source, config.text.encoder = "latents:/nonexistent", "trainable"
  tasks.validate(config)


def test_a_run_builds_its_abstract_state_and_model_once(tmp_path, monkeypatch):
  calls = {"abstract_state": 0, "abstract_model": 0}
  real_state, real_model = state_lib.abstract_state, text_to_image.TextToImageTask.abstract_model

  def counted_state(*args, **kwargs):
    calls["abstract_state"] += 1
    return real_state(*args, **kwargs)

  def counted_model(self, *args, **kwargs):
    calls["abstract_model"] += 1
    return real_model(self, *args, **kwargs)

  monkeypatch.setattr(state_lib, "abstract_state", counted_state)
  monkeypatch.setattr(text_to_image.TextToImageTask, "abstract_model", counted_model)
  metrics = loop.train(train_config(num_train_steps=2, heldout__every_steps=0), str(tmp_path))
  assert metrics["loss"] > 0
  assert calls == {"abstract_state": 1, "abstract_model": 1}
