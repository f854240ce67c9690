"""Which config fields may change when a run resumes from its checkpoints, and which may not.

A workdir's `config.json` is the config its checkpoints were written with. A new
start in the same workdir compares it with the new config field by field:

* `RESUME_STATE_FIELDS` change what the saved state is or means: its shapes
  (model, text encoder, image size), its structure (the optimizer and Muon's
  split of the parameters), the class-conditional objective and noise schedule, or the data stream
  and noise the saved step and iterator position refer to (seed, batch size, source). A difference stops the
  run before anything is written.
* `RESUME_SAFE_FIELDS` only steer what happens next (steps, learning rate,
  logging, checkpoint and eval cadence, sampling (also the class-conditional sampler), GenEval, the frozen encoders'
  folders, the mesh: checkpoints restore onto any mesh, input threads). A difference is reported in one line.

Every key of `base_config()` is under exactly one of the two (a test checks it),
so a new key has to be classified when it is added.
"""

from __future__ import annotations

from typing import Any

from ec_dit.schema.defaults import base_config

RESUME_STATE_FIELDS = (
    "model", "text", "optimizer", "muon", "seed", "batch_size",
    "class_diffusion.objective", "class_diffusion.num_timesteps", "class_diffusion.beta_start",
    "class_diffusion.beta_end",
    "input.image_size", "input.source", "input.num_examples", "input.data_seed", "input.shuffle",
    "input.shapes_world_tasks", "input.image_key", "input.caption_key",
    "heldout.num_examples",  # for file and latent sources: which records training leaves out
)
RESUME_SAFE_FIELDS = (
    "num_train_steps", "learning_rate", "warmup_steps", "weight_decay", "adam_b1", "adam_b2", "grad_clip_norm",
    "ema_decay", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints", "eval_every_steps",
    "diffusion", "sample", "geneval", "mesh", "encoders", "upcycled",
    "class_diffusion.sampler", "class_diffusion.num_sampling_steps", "class_diffusion.guidance_scale",
    "class_diffusion.guidance_channels", "class_diffusion.class_labels",
    "input.worker_count", "input.read_threads", "input.prefetch_buffer_size", "input.tfds_data_dir",
    "input.skip_bad_examples",
    "model.ffn.dropless_impl",  # how the same grouped matmuls are computed: no change to the state
    # the held-out loss's cadence and grid: what is measured, not what is trained
    "heldout.every_steps", "heldout.batch_size", "heldout.t_values", "heldout.seed",
)


def _under(field: str, prefixes) -> bool:
  return any(field == p or field.startswith(p + ".") for p in prefixes)


def is_state_field(field: str) -> bool:
  """True when `field` (dotted, e.g. "model.ffn.num_experts") may not change on resume.

  A safe field inside a state section (`model.ffn.dropless_impl` in `model`) is safe.
  """
  return _under(field, RESUME_STATE_FIELDS) and not _under(field, [
      p for p in RESUME_SAFE_FIELDS if any(p.startswith(s + ".") for s in RESUME_STATE_FIELDS)])


def is_safe_field(field: str) -> bool:
  """True when `field` may change on resume."""
  return _under(field, RESUME_SAFE_FIELDS)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{"a.b.c": leaf} of a nested dict (a ConfigDict's `to_dict()` or a loaded config.json)."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(flatten(value, name + "."))
    else:
      out[name] = value
  return out


def _normal(value: Any) -> Any:
  """Tuples and lists compare equal (config.json stores tuples as lists)."""
  if isinstance(value, (tuple, list)):
    return [_normal(v) for v in value]
  return value


def config_differences(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
  """(field, old value, new value) for every field that differs, in schema order.

  Both are nested dicts. Keys the old config lacks (added to the schema since it
  was saved) take their defaults first, so an older run compares cleanly; keys
  no longer in the schema are ignored.
  """
  defaults = flatten(base_config().to_dict())
  old_flat = dict(defaults, **flatten(old))
  new_flat = dict(defaults, **flatten(new))
  out = []
  for f in defaults:
    a, b = old_flat.get(f), new_flat.get(f)
    if _normal(a) != _normal(b):
      out.append((f, a, b))
  return out


# State fields that only name the data stream and noise a saved step and iterator position refer to: a
# checkpoint without a data iterator (an imported one, `python -m ec_dit.convert`) may change them.
DATA_STREAM_FIELDS = ("seed", "batch_size", "input")


def split_differences(differences, *, data_stream_saved: bool = True):
  """(state-changing differences, safe differences); unclassified fields count as state-changing.

  With `data_stream_saved=False` (the checkpoints hold no data iterator) the
  `DATA_STREAM_FIELDS` are safe: the weights do not refer to a position in any data.
  """
  free = () if data_stream_saved else DATA_STREAM_FIELDS
  safe = [d for d in differences if (is_safe_field(d[0]) and not is_state_field(d[0])) or _under(d[0], free)]
  state = [d for d in differences if d not in safe]
  return state, safe
