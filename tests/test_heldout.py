"""The held-out loss: logged by default runs, a function of the parameters alone (same bits from one checkpoint
twice), and its examples never in the training stream (ShapesWorld past num_examples; other sources' last records)."""

import collections
import json

import numpy as np
import pytest
from PIL import Image

from ec_dit import checkpoint, schema, sharding, tasks, tokenizer as tokenizer_lib
from ec_dit.data import pipeline, sources
from ec_dit.training import heldout, loop, optimizers, state as state_lib
from helpers import train_config


def _rows(workdir):
  with open(workdir / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


def _held_out(config):
  tokenize = tokenizer_lib.tokenizer_from_config(config).encode
  graphdef, _ = state_lib.init_model(config)
  return heldout.HeldOut(config, graphdef, sharding.make_mesh(config.mesh), tokenize)


def _restore(config, workdir, step):
  tx = optimizers.make_optimizer(config)
  mesh = sharding.make_mesh(config.mesh)
  abstract = state_lib.abstract_state(config, tx, mesh)
  manager = checkpoint.make_manager(str(workdir), keep=10)
  dataset = pipeline.create_dataset(config.input, batch_size=config.batch_size,
                                    tokenize=tokenizer_lib.tokenizer_from_config(config).encode,
                                    seed=config.input.data_seed)
  _, state, ema, _ = checkpoint.restore_latest_good(manager, abstract.state, abstract.ema, iter(dataset),
                                                    iterator_args=pipeline.iterator_restore_args)
  assert int(state["step"]) == step
  manager.close()
  return state["params"], ema


def test_logged_by_default_and_same_bits_from_one_checkpoint(tmp_path):
  assert schema.base_config().heldout.every_steps > 0  # every default run logs it
  config = train_config(num_train_steps=4, checkpoint_every_steps=4, heldout__num_examples=12,
                        heldout__every_steps=2)
  loop.train(config, str(tmp_path))
  rows = {r["step"]: r for r in _rows(tmp_path) if "heldout/loss_ema" in r}
  assert sorted(rows) == [2, 4]
  assert all(f"heldout/ema_t{t:g}" in rows[4] for t in config.heldout.t_values)
  assert "heldout/loss" in rows[4] and "loss" in rows[4]  # merged into the step's one log line
  assert rows[2]["heldout/loss_ema"] != rows[4]["heldout/loss_ema"]
  params, ema = _restore(config, tmp_path, 4)
  first = _held_out(config).metrics(params, ema)
  second = _held_out(config).metrics(params, ema)  # a new set, noise and jit: the same bits
  assert first == second
  assert first["heldout/loss_ema"] == rows[4]["heldout/loss_ema"]  # what the run logged, from the checkpoint alone
  assert first["heldout/loss"] == rows[4]["heldout/loss"]


def test_batching_does_not_change_the_value():
  """Per-image routing: the value is the same whatever the held-out batch size (up to float sums)."""
  config = train_config(heldout__num_examples=10, heldout__batch_size=4)
  held = _held_out(config)
  _, params = state_lib.init_model(config)
  config.heldout.batch_size = 10
  other = _held_out(config)
  assert len(held.batches) == 3 and len(other.batches) == 1
  np.testing.assert_allclose(held.per_t(params), other.per_t(params), rtol=1e-5)


def test_shapes_world_held_out_examples_never_in_training_stream():
  config = train_config(input__num_examples=50, heldout__num_examples=20)
  c = config.input
  source, indices = sources.held_out_source(c, 20)
  assert list(indices) == list(range(50, 70))
  held = {source[i]["image"].tobytes() for i in indices}
  assert len(held) == 20
  ds = pipeline.create_dataset(c, batch_size=10, tokenize=tokenizer_lib.tokenizer_from_config(config).encode,
                               seed=c.data_seed, holdout=20)
  it = iter(ds)
  seen = set()
  for _ in range(15):  # three epochs of the 50 training examples
    for image in next(it)["image"]:
      seen.add(np.rint((image + 1.0) * 127.5).astype(np.uint8).tobytes())
  assert len(seen) == 50 and not seen & held
  # the held-out examples are decoded as training decodes them
  examples = pipeline.held_out_examples(c, 20, tokenize=tokenizer_lib.tokenizer_from_config(config).encode)
  got = {np.rint((x + 1.0) * 127.5).astype(np.uint8).tobytes() for x in examples["image"]}
  assert got == held


def test_folder_source_holds_out_its_last_records(tmp_path):
  rng = np.random.default_rng(0)
  for i in range(40):
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(tmp_path / f"{i:03d}.png")
    (tmp_path / f"{i:03d}.txt").write_text(f"image {i}")
  config = train_config(input__source=f"folder:{tmp_path}")
  c = config.input
  assert sources.held_out_count(c, 40, 256) == 4  # at most a tenth
  tokenize = tokenizer_lib.tokenizer_from_config(config).encode
  examples = pipeline.held_out_examples(c, 256, tokenize=tokenize)
  assert examples["image"].shape == (4, 16, 16, 3)
  held = {x.tobytes() for x in examples["image"]}
  it = iter(pipeline.create_dataset(c, batch_size=4, tokenize=tokenize, seed=0, holdout=256))
  seen = {x.tobytes() for _ in range(27) for x in next(it)["image"]}  # three epochs of 36
  assert len(seen) == 36 and not seen & held



def test_a_source_too_small_to_hold_out_turns_the_loss_off_in_one_line(tmp_path):
  for i in range(9):  # fewer than 10 records: none held out
    Image.fromarray(np.full((16, 16, 3), 20 * i, np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / f"{i}.txt").write_text(f"image {i}")
  config = train_config(input__source=f"folder:{tmp_path}")
  tokenize = tokenizer_lib.tokenizer_from_config(config).encode
  assert pipeline.held_out_examples(config.input, 256, tokenize=tokenize) == {}
  said = []
  graphdef, _ = state_lib.init_model(config)
  mesh = sharding.make_mesh(config.mesh)
  assert heldout.held_out_or_none(config, graphdef, mesh, tokenize, report=said.append) is None
  assert len(said) == 1 and "too small to hold records out" in said[0]
  with pytest.raises(ValueError, match=r"config\.input\.source: .* too few records"):
    heldout.HeldOut(config, graphdef, mesh, tokenize)

def test_config_errors_name_the_field():
  for field, value in (("every_steps", -1), ("num_examples", 0), ("t_values", ()), ("t_values", (0.0, 0.5))):
    config = train_config()
    config.heldout[field] = value
    with pytest.raises(ValueError, match=rf"config\.heldout\.{field}"):
      tasks.validate(config)
  assert schema.is_safe_field("heldout.every_steps") and schema.is_state_field("heldout.num_examples")


def test_whole_batch_groups_evaluate():
  """Batch-level routing groups (routing_group_size=-1) evaluate on batches of the training size."""
  config = train_config("ec_batch", heldout__num_examples=6)
  held = _held_out(config)
  assert held.batch_size == 4 and held.weights.sum() == 6
  _, params = state_lib.init_model(config)
  assert np.isfinite(held.loss(params))


def test_class_conditional_latents_hold_out_records_and_evaluate(tmp_path):
  """Prepared latents (here a class-conditional DiT-MoE's): the last record is held out of the stream, and the
  loss (rectified flow and DDPM) is the same bits twice."""
  from dit_moe_fixtures import class_config, prepare_class_latents  # builds a VAE: only this test pays for it
  folder, _ = prepare_class_latents(tmp_path)
  config = class_config(input__source=f"latents:{folder}")
  c = config.input
  examples = pipeline.held_out_examples(c, 256, tokenize=None)
  assert examples["latent_mean"].shape == (1, 8, 8, 4)  # a tenth of 12 records

  def epoch(**kw):  # the latents of one epoch, as a multiset (the fixture's images repeat within a class)
    batch = next(iter(pipeline.create_dataset(c, tokenize=None, seed=0, num_epochs=1, **kw)))
    return collections.Counter(x.tobytes() for x in batch["latent_mean"])
  training, everything = epoch(batch_size=11, holdout=256), epoch(batch_size=12)
  assert training + collections.Counter([examples["latent_mean"][0].tobytes()]) == everything
  source, indices = sources.held_out_source(c, 256)
  assert list(indices) == [11]  # the last record
  for objective in ("rectified_flow", "ddpm"):
    config.class_diffusion.objective = objective
    config.class_diffusion.sampler = "euler" if objective == "rectified_flow" else "ddpm"
    tx = optimizers.make_optimizer(config)
    abstract = state_lib.abstract_state(config, tx)
    state, ema = state_lib.init_state(config, tx, abstract)
    held = heldout.HeldOut(config, abstract.graphdef, abstract.mesh, None)
    first, second = held.metrics(state["params"], ema), held.metrics(state["params"], ema)
    assert first == second and np.isfinite(first["heldout/loss_ema"])
