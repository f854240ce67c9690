"""The full DiT: shapes, logical axes, placement of MoE layers, text cache, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ec_dit.model import dit
from ec_dit.tools import model_summary
from helpers import micro_config


def _batch(m, b=2, seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(k[0], (b, m.input_size, m.input_size, m.in_channels))
  t = jax.random.uniform(k[1], (b,))
  ctx = jax.random.normal(k[2], (b, m.context_len, m.context_dim))
  mask = jnp.arange(m.context_len)[None, :] < jnp.array([3, m.context_len])[:b, None]
  return x, t, ctx, mask


def _randomize(model, seed=1):
  """Zero-initialised output layers make every output 0; give them values for tests."""
  graph, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [0.05 * jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)]
  return nnx.merge(graph, jax.tree.unflatten(treedef, leaves))


@pytest.mark.parametrize("variant", ["ec", "tc", "dit_moe", "dense"])
def test_every_parameter_has_logical_axis_names(variant):
  model = model_summary.abstract_dit(micro_config(variant).model)
  rows = model_summary.param_table(model)
  assert rows
  for path, shape, axes in rows:
    assert len(axes) == len(shape) and all(isinstance(a, str) for a in axes), path


def test_moe_placement_every_other_layer_after_dense_prefix():
  f = micro_config().model.ffn
  assert [dit.is_moe_layer(i, f) for i in range(6)] == [False, True, False, True, False, True]
  f.dense_first_n = 3
  assert [dit.is_moe_layer(i, f) for i in range(6)] == [False, False, False, True, False, True]
  f.moe_every, f.dense_first_n = 1, 0
  assert all(dit.is_moe_layer(i, f) for i in range(6))


def test_full_model_parameter_shapes_per_ffn_kind():
  shapes = {}
  for variant in ("ec", "tc", "dit_moe", "dense"):
    m = micro_config(variant).model
    shapes[variant] = {p: s for p, s, _ in model_summary.param_table(model_summary.abstract_dit(m))}
  ec = shapes["ec"]
  assert ec["blocks/1/ffn/experts/wi"] == (4, 32, 128)
  assert ec["blocks/1/ffn/experts/wo"] == (4, 128, 32)
  assert ec["blocks/1/ffn/router/proj/kernel"] == (32, 4)
  assert ec["blocks/0/ffn/wi/kernel"] == (32, 128)  # dense layer between MoE layers
  assert ec["patch_embed/proj/kernel"] == (2 * 2 * 3, 32)
  assert ec["final/proj/kernel"] == (32, 12)
  assert ec["blocks/0/adaln/kernel"] == (32, 192)
  assert "blocks/1/ffn/shared/0/wi/kernel" in shapes["dit_moe"]
  assert not any("shared" in p for p in shapes["tc"])
  assert shapes["dense"]["blocks/1/ffn/wi/kernel"] == (32, 256)  # 2 x 4d at the MoE positions


@pytest.mark.parametrize("variant", ["ec", "tc", "dense"])
def test_forward_shapes_diagnostics_and_zero_init(variant):
  m = micro_config(variant).model
  model = dit.DiT(m, rngs=nnx.Rngs(0))
  x, t, ctx, mask = _batch(m)
  v, aux = model(x, t, ctx, mask)
  assert v.shape == x.shape and v.dtype == jnp.float32
  # adaLN-Zero + zero final layer: the network outputs 0 (velocity 0, or x0 = 0 so v = x_t / t).
  expected = 0.0 if m.prediction == "velocity" else x / np.maximum(t, dit.X0_MIN_T)[:, None, None, None]
  np.testing.assert_allclose(v, expected, rtol=1e-6)
  if variant == "dense":
    assert aux["moe"] == {}
  else:
    assert sorted(aux["moe"]) == ["layer_01", "layer_03"]
    d = aux["moe"]["layer_01"]
    assert d["experts_per_token"].shape == (2, 64)
    for key in ("expert_usage", "router_z_loss", "dropped_fraction", "mean_top_gate"):
      assert key in d


def test_cached_text_kv_equals_uncached():
  m = micro_config().model
  model = _randomize(dit.DiT(m, rngs=nnx.Rngs(0)))
  x, t, ctx, mask = _batch(m)
  v1, _ = model(x, t, ctx, mask)
  cache = model.encode_context(ctx, mask)
  v2, _ = model(x, t, context_cache=cache)
  assert float(jnp.abs(v1).max()) > 0
  np.testing.assert_allclose(v1, v2, atol=1e-6)


def test_text_mask_hides_padding_and_empty_prompt_is_finite():
  m = micro_config().model
  model = _randomize(dit.DiT(m, rngs=nnx.Rngs(0)))
  x, t, ctx, mask = _batch(m)
  v1, _ = model(x, t, ctx, mask)
  v2, _ = model(x, t, ctx.at[0, 3:].set(99.0), mask)  # change only masked tokens of image 0
  np.testing.assert_allclose(v1, v2, atol=1e-6)
  v3, _ = model(x, t, ctx, jnp.zeros_like(mask))
  assert np.all(np.isfinite(v3))


def test_image_output_independent_of_batch_mates():
  m = micro_config(dispatch="gather").model
  model = _randomize(dit.DiT(m, rngs=nnx.Rngs(0)))
  x, t, ctx, mask = _batch(m, b=2)
  v_pair, _ = model(x, t, ctx, mask)
  v_alone, _ = model(x[:1], t[:1], ctx[:1], mask[:1])
  np.testing.assert_allclose(v_pair[:1], v_alone, atol=1e-5)


@pytest.mark.parametrize("variant", ["ec", "tc"])
def test_model_gradients_finite_and_reach_every_parameter(variant):
  m = micro_config(variant, router_z_loss_coef=1e-3).model
  model = _randomize(dit.DiT(m, rngs=nnx.Rngs(0)))
  x, t, ctx, mask = _batch(m)

  def loss(model):
    v, aux = model(x, t, ctx, mask)
    return jnp.mean(v ** 2) + aux["aux_loss"]

  grads = nnx.grad(loss)(model)
  flat = nnx.to_flat_state(nnx.state(grads))
  for path, g in flat:
    g = g[...]
    assert np.all(np.isfinite(g)), path
  router = [g[...] for p, g in flat if "router" in p]
  assert router and all(float(jnp.abs(g).sum()) > 0 for g in router)


def test_decoupled_routing_changes_router_input_only():
  m = micro_config().model
  model_a = _randomize(dit.DiT(m, rngs=nnx.Rngs(0)))
  m.ffn.decoupled_routing = True
  model_b = dit.DiT(m, rngs=nnx.Rngs(0))
  nnx.update(model_b, nnx.state(model_a))
  x, t, ctx, mask = _batch(m)
  _, aux_a = model_a(x, t, ctx, mask)
  _, aux_b = model_b(x, t, ctx, mask)
  pa = np.asarray(aux_a["moe"]["layer_01"]["router_prob_per_expert"])
  pb = np.asarray(aux_b["moe"]["layer_01"]["router_prob_per_expert"])
  assert not np.allclose(pa, pb)


def test_bfloat16_compute_option():
  m = micro_config().model
  m.dtype = "bfloat16"
  model = _randomize(dit.DiT(m, rngs=nnx.Rngs(0)))
  x, t, ctx, mask = _batch(m)
  v, aux = model(x, t, ctx, mask)
  assert v.dtype == jnp.float32 and np.all(np.isfinite(v))
  assert all(p[...].dtype == jnp.float32 for _, p in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def test_x0_prediction_returns_the_velocity_of_the_predicted_image():
  """prediction="x0": the network's output is the clean image; the model returns
  v = (x_t - x0_hat) / max(t, X0_MIN_T), so x_t - t * v recovers x0_hat for t >= X0_MIN_T."""
  m = micro_config().model
  x, t, ctx, mask = _batch(m)
  t = jnp.array([0.5, 0.01])
  m.prediction = "velocity"
  velocity_model = _randomize(dit.DiT(m, rngs=nnx.Rngs(0)))
  m.prediction = "x0"
  x0_model = nnx.merge(nnx.graphdef(dit.DiT(m, rngs=nnx.Rngs(0))), nnx.state(velocity_model))
  raw, _ = velocity_model(x, t, ctx, mask)  # same weights: the raw network output
  v, _ = x0_model(x, t, ctx, mask)
  t_safe = np.maximum(np.asarray(t), dit.X0_MIN_T)[:, None, None, None]
  np.testing.assert_allclose(v, (np.asarray(x) - np.asarray(raw)) / t_safe, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(x)[0] - 0.5 * np.asarray(v)[0], np.asarray(raw)[0], rtol=1e-5, atol=1e-5)


def test_long_skips_start_as_the_plain_dit_and_learn():
  """U-ViT long skips: block i < n feeds block depth-1-i; at init the model equals the plain DiT."""
  m = micro_config().model
  m.depth = 5
  assert dit.num_long_skips(5) == 2
  plain = _randomize(dit.DiT(m, rngs=nnx.Rngs(0)))
  m.long_skips = True
  skipped = dit.DiT(m, rngs=nnx.Rngs(0))
  nnx.update(skipped, nnx.state(plain))  # shared weights; skip projections keep their init
  x, t, ctx, mask = _batch(m)
  np.testing.assert_allclose(skipped(x, t, ctx, mask)[0], plain(x, t, ctx, mask)[0], rtol=1e-5, atol=1e-6)

  def loss(model):
    return jnp.mean(jnp.square(model(x, t, ctx, mask)[0] - 1.0))
  grads = nnx.grad(loss)(skipped)
  for k in range(dit.num_long_skips(m.depth)):
    assert float(jnp.abs(grads.skip_proj[k].kernel[...][m.hidden_size:]).sum()) > 0  # the skip half learns
