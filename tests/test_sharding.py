"""Mesh and sharding on 8 forced CPU devices: rules, sharded == single device, AOT compile.

(Restoring a checkpoint onto a different mesh is tested in test_multihost.py.)

Meshes are (data, fsdp, expert, tensor). The equality tests compile one
function per mesh that returns the forward pass, the gradients and a full
train step, at XLA's backend optimisation level 0 (for compile time; the
reference is compiled the same way).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from ec_dit import diffusion, sharding, tasks
from ec_dit.tools import compile_report as aot
from ec_dit.training import optimizers, state as state_lib, step as step_lib
from helpers import perturbed, train_config

# Every axis sharded in at least one mesh, each with another axis: (8, 1, 1, 1), pure data parallelism, runs in
# tests/test_multihost.py; (2, 1, 2, 2) adds nothing that (2, 2, 2, 1) and (1, 2, 2, 2) do not check.
MESHES = [(2, 2, 2, 1), (1, 1, 8, 1), (1, 2, 2, 2)]
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _config(variant=None, mesh=(-1, 1, 1, 1), **overrides):
  """train_config with 8 experts (so expert=8 shards them) and a batch of 8 (so every mesh splits it)."""
  config = train_config(variant, batch_size=8, **overrides)
  config.model.ffn.num_experts = 8
  config.mesh.data, config.mesh.fsdp, config.mesh.expert, config.mesh.tensor = mesh
  return config


def _mesh(config, n=None):
  devices = jax.devices()[:n] if n else None
  return sharding.make_mesh(config.mesh, devices)


# ----------------------------------------------------------------------------
# Rules


def test_logical_to_spec_rules():
  mesh = sharding.make_mesh(_config(mesh=(2, 2, 2, 1)).mesh)
  rules = sharding.DEFAULT_RULES
  spec = lambda axes, shape: sharding.logical_to_spec(axes, shape, mesh, rules)  # noqa: E731
  assert spec(("expert", "embed", "expert_mlp"), (8, 32, 128)) == P("expert", "fsdp")  # tensor has size 1: left out
  assert spec(("batch", None), (8, 3)) == P(("data", "fsdp", "expert"))
  # not divisible: the longest dividing prefix of the rule's axes, else replicated
  assert spec(("batch", None), (4, 3)) == P(("data", "fsdp"))
  assert spec(("batch",), (3,)) == P()
  assert spec(("expert", "embed"), (3, 32)) == P(None, "fsdp")
  # a mesh axis is used once per array: the later dimension drops it
  same = (("a", "fsdp"), ("b", ("fsdp", "expert")))
  assert sharding.logical_to_spec(("a", "b"), (4, 4), mesh, same) == P("fsdp", "expert")
  assert sharding.logical_to_spec(("b", "a"), (4, 4), mesh, same) == P(("fsdp", "expert"))
  assert sharding.logical_to_spec(("a", "a"), (4, 4), mesh, same) == P("fsdp")
  with pytest.raises(ValueError, match="'nope' has no rule"):
    spec(("nope",), (4,))


@pytest.mark.parametrize("field,value,match", [
    ("data", 0, "config.mesh.data"),
    ("tensor", -1, "at most one axis of size -1"),
    ("rules", (("embed", "model"),), "config.mesh.rules"),
    ("rules", (("embed", "fsdp"), ("embed", None)), "appears twice"),
])
def test_mesh_config_is_validated(field, value, match):
  config = _config()
  config.mesh[field] = value
  with pytest.raises(ValueError, match=match):
    tasks.validate(config)


def test_mesh_shape_resolves_the_rest_and_checks_the_device_count():
  config = _config(mesh=(-1, 2, 1, 1))
  assert sharding.mesh_shape(config.mesh, 8) == (4, 2, 1, 1)
  with pytest.raises(ValueError, match="cannot fill 6 devices"):
    sharding.mesh_shape(_config(mesh=(-1, 4, 1, 1)).mesh, 6)
  with pytest.raises(ValueError, match="uses 4 devices, but there are 8"):
    sharding.mesh_shape(_config(mesh=(1, 2, 2, 1)).mesh, 8)
  assert dict(sharding.make_mesh(_config().mesh).shape) == {"data": 8, "fsdp": 1, "expert": 1, "tensor": 1}


def test_every_parameter_is_sharded_by_its_logical_axes():
  config = _config(mesh=(1, 2, 2, 2), optimizer="adamw")
  mesh = _mesh(config)
  tx = optimizers.make_optimizer(config)
  state, ema = state_lib.init_state(config, tx, state_lib.abstract_state(config, tx, mesh))
  abstract = nnx.state(tasks.task_for(config).abstract_model(config), nnx.Param)
  flat_vars = dict(nnx.to_flat_state(abstract))
  flat_params = dict(jax.tree_util.tree_flatten_with_path(state["params"])[0])
  assert len(flat_vars) == len(flat_params) > 20
  checked = 0
  for (path, variable), (_, value) in zip(sorted(flat_vars.items()), sorted(
      ((tuple(k.key for k in kp), v) for kp, v in flat_params.items()))):
    axes = variable.get_metadata()["out_sharding"]
    expected = sharding.logical_to_spec(axes, variable.shape, mesh, config.mesh.rules)
    assert value.sharding.spec == expected, (path, axes)
    assert value.sharding.mesh.shape == mesh.shape
    shard = value.addressable_shards[0].data.shape
    assert shard == value.sharding.shard_shape(value.shape)
    checked += 1
  assert checked == len(flat_vars)
  blocks = state["params"]["dit"]["blocks"]
  experts = blocks[1]["ffn"]["experts"]
  assert experts["wi"].sharding.spec == P("expert", "fsdp", "tensor")        # [8, 32, 128]
  assert experts["wi"].addressable_shards[0].data.shape == (4, 16, 64)
  assert experts["wo"].sharding.spec == P("expert", "tensor", "fsdp")
  assert experts["bi"].sharding.spec == P("expert", "tensor")
  assert blocks[0]["attn"]["qkv"]["kernel"].sharding.spec == P("fsdp", "tensor")
  assert blocks[0]["ffn"]["wi"]["kernel"].sharding.spec == P("fsdp", "tensor")
  assert blocks[1]["ffn"]["router"]["proj"]["kernel"].sharding.spec == P("fsdp")
  assert state["params"]["text"]["embed"].sharding.spec == P(None, "fsdp")
  # optimizer moments and EMA follow their parameters; the step is replicated
  mu = state["opt_state"][1][0].mu
  assert mu["dit"]["blocks"][1]["ffn"]["experts"]["wi"].sharding.spec == P("expert", "fsdp", "tensor")
  assert ema["dit"]["blocks"][1]["ffn"]["experts"]["wi"].sharding.spec == P("expert", "fsdp", "tensor")
  assert state["step"].sharding.spec == P()


def test_muon_and_adamw_states_inside_a_partition_follow_their_parameters():
  config = _config(mesh=(1, 2, 2, 2), optimizer="muon", muon__experts=False)
  tx = optimizers.make_optimizer(config)
  state, _ = state_lib.init_state(config, tx, state_lib.abstract_state(config, tx, _mesh(config)))
  inner = state["opt_state"][1].inner_states
  muon_mu = inner["muon"].inner_state[0].mu
  adam_mu = inner["adamw"].inner_state[0].mu
  assert muon_mu["dit"]["blocks"][0]["attn"]["qkv"]["kernel"].sharding.spec == P("fsdp", "tensor")
  assert adam_mu["dit"]["blocks"][1]["ffn"]["experts"]["wi"].sharding.spec == P("expert", "fsdp", "tensor")
  assert adam_mu["text"]["embed"].sharding.spec == P(None, "fsdp")
  assert inner["adamw"].inner_state[0].count.sharding.spec == P()


# ----------------------------------------------------------------------------
# Sharded == single device


def _batch(config, seed=0):
  rng = np.random.default_rng(seed)
  b, m = config.batch_size, config.model
  return {"image": rng.uniform(-1, 1, (b, m.input_size, m.input_size, m.in_channels)).astype(np.float32),
          "tokens": rng.integers(1, config.text.vocab_size, (b, m.context_len)).astype(np.int32),
          "mask": np.arange(m.context_len)[None, :] < rng.integers(0, m.context_len + 1, (b, 1))}


def _probe(config, mesh, host_state, host_ema, batch):
  """(velocity, grads, next state, next ema, metrics) computed on `mesh`, as numpy."""
  tx = optimizers.make_optimizer(config)
  abstract = state_lib.abstract_state(config, tx, mesh)
  graphdef, sh = abstract.graphdef, abstract.shardings
  step = step_lib.make_train_step(config, abstract, tx).__wrapped__  # the traced body of the real step
  b = config.batch_size

  def probe(state, ema, batch):
    with sharding.activation_sharding(mesh, config.mesh.rules):
      model = nnx.merge(graphdef, state["params"])
      t = jnp.linspace(0.05, 0.95, b)
      velocity, _ = model(batch["image"], t, batch["tokens"], batch["mask"])

      def loss_fn(params):
        return diffusion.rectified_flow_loss(nnx.merge(graphdef, params), batch["image"], batch["tokens"],
                                             batch["mask"], jax.random.key(3))[0]
      grads = jax.grad(loss_fn)(state["params"])
    return (velocity, grads) + step(state, ema, batch)

  args = (jax.device_put(host_state, sh["state"]), jax.device_put(host_ema, sh["ema"]),
          jax.device_put(batch, sh["batch"]))
  compiled = jax.jit(probe, in_shardings=(sh["state"], sh["ema"], sh["batch"])).lower(*args).compile(FAST_COMPILE)
  return jax.device_get(compiled(*args))


@pytest.mark.parametrize("variant", ["ec", "tc"])
def test_sharded_forward_gradient_and_train_step_equal_single_device(variant):
  config = _config(variant, warmup_steps=0)  # a non-zero learning rate at the first step
  tx = optimizers.make_optimizer(config)
  one = _mesh(_config(variant, mesh=(1, 1, 1, 1)), 1)
  state, _ = state_lib.init_state(config, tx, state_lib.abstract_state(config, tx, one))
  params = perturbed(jax.device_get(state["params"]))
  host_state = jax.device_get({"step": np.zeros((), np.int32), "params": params, "opt_state": tx.init(params)})
  host_ema = jax.tree.map(np.copy, params)
  batch = _batch(config)
  ref_config = _config(variant, mesh=(1, 1, 1, 1), warmup_steps=0)
  ref = _probe(ref_config, _mesh(ref_config, 1), host_state, host_ema, batch)
  ref_v, ref_grads, ref_state, ref_ema, ref_metrics = ref
  assert np.abs(ref_v).max() > 0 and ref_metrics["grad_norm"] > 0
  assert not np.allclose(ref_state["params"]["dit"]["blocks"][1]["ffn"]["experts"]["wi"],
                         host_state["params"]["dit"]["blocks"][1]["ffn"]["experts"]["wi"])
  for shape in MESHES:
    config = _config(variant, mesh=shape, warmup_steps=0)
    v, grads, new_state, new_ema, metrics = _probe(config, _mesh(config), host_state, host_ema, batch)
    np.testing.assert_allclose(v, ref_v, rtol=1e-4, atol=1e-5, err_msg=f"forward on {shape}")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"grads on {shape}"),
                 grads, ref_grads)
    close = lambda atol: lambda a, b: np.testing.assert_allclose(  # noqa: E731
        a, b, rtol=1e-4, atol=atol, err_msg=f"step on {shape}")
    jax.tree.map(close(1e-5), new_state["opt_state"], ref_state["opt_state"])  # Adam moments: linear in grads
    # Adam's first update is lr * g / (|g| + eps): for gradients at the float32 noise floor
    # (|g| ~ eps = 1e-8) it turns rounding differences into a sizeable fraction of lr (one
    # element in 64 moved by 0.13 lr once the tiny config weighted its loss). The moments
    # above already pin the gradients; atol = lr / 2 still fails any update that is
    # missing or has the wrong sign (off by lr or more).
    jax.tree.map(close(0.5 * config.learning_rate), (new_state["params"], new_ema), (ref_state["params"], ref_ema))
    assert int(new_state["step"]) == 1
    for key in ("loss", "mse", "grad_norm", "aux_loss"):
      np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, atol=1e-6, err_msg=f"{key} on {shape}")


# ----------------------------------------------------------------------------
# Ahead-of-time compile


def test_aot_compile_reports_per_device_memory_without_allocating_weights():
  config = _config(mesh=(1, 2, 2, 2))
  config.model.remat_policy = "full"
  before = len(jax.live_arrays())
  report = aot.memory_report(config)
  assert len(jax.live_arrays()) == before  # abstract inputs only: nothing was allocated
  assert report["mesh"] == {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2} and report["devices"] == 8
  assert report["argument_gib"] > 0 and report["temp_gib"] > 0 and report["total_gib"] > report["argument_gib"]
  assert report["alias_gib"] > 0  # state and EMA are donated
  # 8-way sharded arguments: well under the full state (params + EMA + 2 Adam moments, float32)
  full_state_gib = 4 * report["num_params"] * 4 / aot.GiB
  assert report["argument_gib"] < 0.5 * full_state_gib
  lines = aot.format_report(report).splitlines()
  assert lines[-1].startswith("{") and '"total_gib"' in lines[-1]
