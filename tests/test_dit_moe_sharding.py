"""Class-conditional (DiT-MoE) training on 8 forced CPU devices with expert=8 equals one device's.

Twice: with random in-memory latents and labels, and with a batch that comes through
the real `latents:DIR` pipeline (a tiny folder prepared from class subfolders by
`ec_dit.prepare`, read by `data.pipeline.create_dataset`, cut to the step's fields by
the task's `train_batch`; the step draws the latents from their mean and std). As in
test_sharding.py, one function per mesh returns the loss's gradients and a full
train step, compiled at XLA's backend optimisation level 0.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from ec_dit import sharding, tasks
from ec_dit.data import pipeline as data_pipeline
from ec_dit.training import optimizers, state as state_lib, step as step_lib
from dit_moe_fixtures import prepare_class_latents, tiny_config
from helpers import perturbed

MESHES = [(1, 1, 8, 1)]  # expert parallelism over all 8 devices (the batch too, by the `batch` rule)
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _config(kind, mesh=(1, 1, 1, 1)):
  config = tiny_config(kind, num_experts=8)  # 8 experts, so expert=8 puts one on each device
  config.batch_size, config.warmup_steps, config.learning_rate = 8, 0, 1e-3
  config.mesh.data, config.mesh.fsdp, config.mesh.expert, config.mesh.tensor = mesh
  return config


def _probe(config, mesh, host_state, host_ema, batch):
  """(grads, next state, next ema, metrics) on `mesh`, as numpy."""
  tx = optimizers.make_optimizer(config)
  abstract = state_lib.abstract_state(config, tx, mesh)
  graphdef, sh, task = abstract.graphdef, abstract.shardings, tasks.task_for(config)
  step = step_lib.make_train_step(config, abstract, tx).__wrapped__  # the traced body of the real step

  def probe(state, ema, batch):
    with sharding.activation_sharding(mesh, config.mesh.rules):
      key = jax.random.fold_in(jax.random.key(config.seed), state["step"])
      inputs = task.model_inputs(config, batch, key)
      grads = jax.grad(lambda p: task.loss(config, nnx.merge(graphdef, p), inputs, key)[0])(state["params"])
    return (grads,) + step(state, ema, batch)

  args = (jax.device_put(host_state, sh["state"]), jax.device_put(host_ema, sh["ema"]),
          jax.device_put(batch, sh["batch"]))
  compiled = jax.jit(probe, in_shardings=(sh["state"], sh["ema"], sh["batch"])).lower(*args).compile(FAST_COMPILE)
  return jax.device_get(compiled(*args))


@pytest.fixture(scope="module")
def prepared_batch(tmp_path_factory):
  """The first batch of 8 of a tiny prepared folder with labels, as the training loop feeds the step."""
  folder, _ = prepare_class_latents(tmp_path_factory.mktemp("dit_moe_sharding"))
  config = _config("token_choice")
  config.input.source, config.input.read_threads = f"latents:{folder}", 0
  ds = data_pipeline.create_dataset(config.input, batch_size=8, tokenize=None, seed=0)
  return tasks.task_for(config).train_batch(config, dict(next(iter(ds))))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["token_choice", "expert_choice"])
def test_class_conditional_training_with_expert_parallelism_equals_one_device(kind):
  _check_expert_parallel_equals_one_device(kind, lambda rng: {
      "image": rng.standard_normal((8, 8, 8, 4)).astype(np.float32),
      "label": rng.integers(0, 10, (8,)).astype(np.int32)})


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["token_choice", "expert_choice"])
def test_training_from_prepared_latents_with_labels_with_expert_parallelism_equals_one_device(kind, prepared_batch):
  assert set(prepared_batch) == {"latent_mean", "latent_std", "label"} and prepared_batch["label"].shape == (8,)
  assert np.all(prepared_batch["label"] >= 0) and len(set(prepared_batch["label"].tolist())) > 1
  _check_expert_parallel_equals_one_device(kind, lambda rng: prepared_batch)


def _check_expert_parallel_equals_one_device(kind, make_batch):
  """The existing assertions, for the batch `make_batch(rng)`."""
  ref_config = _config(kind)
  tx = optimizers.make_optimizer(ref_config)
  one = sharding.make_mesh(ref_config.mesh, jax.devices()[:1])
  state, _ = state_lib.init_state(ref_config, tx, state_lib.abstract_state(ref_config, tx, one))
  params = perturbed(jax.device_get(state["params"]))
  rng = np.random.default_rng(2)
  host_state = {"step": np.zeros((), np.int32), "params": params, "opt_state": jax.device_get(tx.init(params))}
  host_ema = jax.tree.map(np.copy, params)
  batch = make_batch(rng)
  ref_grads, ref_state, ref_ema, ref_metrics = _probe(ref_config, one, host_state, host_ema, batch)
  assert ref_metrics["grad_norm"] > 0 and ref_metrics["vb"] > 0
  assert (ref_metrics["aux_loss"] > 0) == (kind == "token_choice")  # the balance loss is token choice's
  wi = lambda s: s["params"]["blocks"][1]["moe"]["routed"]["experts"]["wi"]  # noqa: E731
  assert not np.allclose(wi(ref_state), wi(host_state))
  for shape in MESHES:
    config = _config(kind, shape)
    mesh = sharding.make_mesh(config.mesh)
    assert mesh.shape["expert"] == shape[2] and mesh.devices.size == 8
    sh = state_lib.abstract_state(config, optimizers.make_optimizer(config), mesh).shardings
    assert sh["state"]["params"]["blocks"][0]["moe"]["routed"]["experts"]["wi"].spec[0] == "expert"
    grads, new_state, new_ema, metrics = _probe(config, mesh, host_state, host_ema, batch)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"grads on {shape}"),
                 grads, ref_grads)
    close = lambda atol: lambda a, b: np.testing.assert_allclose(  # noqa: E731
        a, b, rtol=1e-4, atol=atol, err_msg=f"step on {shape}")
    jax.tree.map(close(1e-5), new_state["opt_state"], ref_state["opt_state"])
    # as test_sharding.py: Adam's first update turns float32 noise in tiny gradients into up to ~lr / 8
    jax.tree.map(close(0.5 * config.learning_rate), (new_state["params"], new_ema), (ref_state["params"], ref_ema))
    for key in ("loss", "mse", "vb", "grad_norm", "aux_loss"):
      np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, atol=1e-6, err_msg=f"{key} on {shape}")
