"""The hand-written gradients of `primitives.matmul`, `primitives.layer_norm`, `primitives.gelu` and
`primitives.softmax` equal autodiff's of the plain formulas, and DiT-MoE's dense FFN kind (the
matched-compute baseline of experiments/benchmark_train.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ec_dit import primitives
from ec_dit.diffusion import class_labels as class_diffusion
from ec_dit.model import dit_moe
from dit_moe_fixtures import tiny_config


def reference_layer_norm(x, eps=1e-6):
  """The plain formula, differentiated by JAX."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def inputs(shape, seed=0, scale=3.0):
  return jax.random.normal(jax.random.key(seed), shape) * scale + 1.0


def test_layer_norm_forward_is_unchanged_and_its_gradient_equals_autodiff():
  x, w = inputs((4, 16, 32)), inputs((4, 16, 32), seed=1, scale=1.0)
  loss = lambda ln: lambda x: jnp.sum(jnp.sin(ln(x)) * w)  # noqa: E731
  np.testing.assert_array_equal(primitives.layer_norm(x), reference_layer_norm(x))
  ours, ref = jax.grad(loss(primitives.layer_norm))(x), jax.grad(loss(reference_layer_norm))(x)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
  assert np.abs(ref).max() > 0.1  # a gradient worth comparing


def test_layer_norm_keeps_bfloat16_inputs_in_bfloat16():
  x = inputs((2, 8, 16)).astype(jnp.bfloat16)
  grad = jax.grad(lambda x: jnp.sum(primitives.layer_norm(x).astype(jnp.float32) ** 3))(x)
  assert grad.dtype == jnp.bfloat16 and primitives.layer_norm(x).dtype == jnp.bfloat16


@pytest.mark.parametrize("shape", [(3, 5, 32), (7, 32), (32,)])
def test_matmul_and_its_gradients_equal_jnp_dot(shape):
  x, kernel = inputs(shape), inputs((32, 24), seed=2, scale=0.3)
  loss = lambda mm: lambda x, k: jnp.sum(jnp.cos(mm(x, k)))  # noqa: E731
  np.testing.assert_array_equal(primitives.matmul(x, kernel), jnp.dot(x, kernel))
  ours = jax.grad(loss(primitives.matmul), (0, 1))(x, kernel)
  ref = jax.grad(loss(jnp.dot), (0, 1))(x, kernel)
  for a, b in zip(ours, ref):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_gelu_and_its_gradient_equal_jax_nn_gelu_tanh():
  x = inputs((4, 64, 33), scale=4.0)  # covers both tails, where tanh saturates
  loss = lambda f: lambda x: jnp.sum(jnp.sin(f(x)))  # noqa: E731
  ref_fn = lambda x: jax.nn.gelu(x, approximate=True)  # noqa: E731
  np.testing.assert_array_equal(primitives.gelu(x), ref_fn(x))
  np.testing.assert_allclose(jax.grad(loss(primitives.gelu))(x), jax.grad(loss(ref_fn))(x), rtol=1e-5, atol=1e-5)
  xb = x.astype(jnp.bfloat16)
  assert jax.grad(lambda x: jnp.sum(primitives.gelu(x).astype(jnp.float32)))(xb).dtype == jnp.bfloat16


def test_softmax_and_its_gradient_equal_jax_nn_softmax():
  x = inputs((3, 4, 16, 12), scale=5.0)
  x = jnp.where(jnp.arange(12) < 9, x, -1e30)  # masked keys, as attention's padding mask writes them
  weights = jax.random.normal(jax.random.key(7), x.shape)
  loss = lambda f: lambda x: jnp.sum(jnp.sin(f(x) * weights))  # noqa: E731
  ref_fn = lambda x: jax.nn.softmax(x, axis=-1)  # noqa: E731
  np.testing.assert_array_equal(primitives.softmax(x), ref_fn(x))
  grad, ref_grad = jax.grad(loss(primitives.softmax))(x), jax.grad(loss(ref_fn))(x)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(grad)[..., 9:] == 0)  # masked keys get no gradient
  xb = x.astype(jnp.bfloat16)
  assert primitives.softmax(xb).dtype == jnp.float32
  assert jax.grad(lambda x: jnp.sum(primitives.softmax(x)[..., 0]))(xb).dtype == jnp.bfloat16


def test_dit_moe_dense_kind_is_one_swiglu_without_router_or_diagnostics():
  config = tiny_config("dense")
  config.model.ffn.dense_mlp_ratio = 5.0
  model = dit_moe.build(config)
  block = model.blocks[0].moe
  assert block.routed is None and block.shared.gate.kernel.shape == (64, 320)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert "router" not in str(jax.tree_util.tree_structure(params))
  batch = {"image": inputs((2, 8, 8, 4)), "label": jnp.array([1, 5])}
  loss, aux = class_diffusion.loss(model, batch, jax.random.key(0), config)
  assert np.isfinite(float(loss)) and aux["moe"] == {} and float(aux["aux_loss"]) == 0.0
