"""Small building blocks shared by every model file.

Every parameter is created through `param`, so every parameter carries logical
axis names (`out_sharding` metadata). Sharding is applied later, from the
config's logical-to-mesh rules (`ec_dit.sharding`), not eagerly at creation:
that is what lets the same module build abstractly for a 97B model.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]

zeros_init = nnx.initializers.zeros_init()
xavier_uniform = nnx.initializers.xavier_uniform()


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], axes: Sequence[str],
          dtype=jnp.float32) -> nnx.Param:
  """A parameter with logical axis names, one name per dimension."""
  if len(axes) != len(shape):
    raise ValueError(f"axes {tuple(axes)} must name each of the {len(shape)} dims of {tuple(shape)}")
  return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(axes),
                   eager_sharding=False)


class Linear(nnx.Module):
  """y = x @ kernel + bias, kernel [in, out] with logical axes `axes`.

  Parameters are stored in `param_dtype` (float32 by default); the matmul runs in
  `dtype` (the model's compute dtype, float32 or bfloat16).
  """

  def __init__(self, in_features: int, out_features: int, axes: tuple[str, str], *,
               rngs: nnx.Rngs, use_bias: bool = True, kernel_init: Initializer = xavier_uniform,
               dtype=jnp.float32, param_dtype=jnp.float32):
    self.kernel = param(rngs, kernel_init, (in_features, out_features), axes, param_dtype)
    self.bias = param(rngs, zeros_init, (out_features,), axes[1:], param_dtype) if use_bias else None
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    y = matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


@jax.custom_vjp
def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x [..., in] @ kernel [in, out], with the same two matmuls as its autodiff backward, but the
  incoming gradient made a buffer of its own first (`optimization_barrier`).

  Why: XLA:CPU transposes the [tokens, width] operands of the kernel gradient
  x^T @ dy, and otherwise fuses all the elementwise work that produces dy (the
  layer norm and adaLN backward, gates, residual sums) into that transpose and
  into each of its other consumers, recomputing it in transposed, cache-hostile
  order. Materialising dy once makes the transpose a plain copy (tiny config:
  see docs/benchmarks.md). Values are the autodiff ones: the same dots on the same operands.
  """
  return jnp.dot(x, kernel)


def _matmul_fwd(x, kernel):
  return jnp.dot(x, kernel), (x, kernel)


def _matmul_bwd(residuals, dy):
  x, kernel = residuals
  dy = jax.lax.optimization_barrier(dy)
  dx = jnp.dot(dy, kernel.T)
  dkernel = jnp.dot(x.reshape(-1, x.shape[-1]).T, dy.reshape(-1, dy.shape[-1]))
  return dx, dkernel


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """LayerNorm without affine parameters (DiT's norm), computed in float32.

  Its gradient is the closed form rstd * (g - mean(g) - y * mean(g * y)) of the
  normalised output y (`_layer_norm_bwd`), a few fused reductions instead of
  autodiff's chain through mean, variance and rsqrt (the same value up to float
  rounding); the forward is unchanged.
  """
  return _layer_norm(x, eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _layer_norm(x, eps):
  return _layer_norm_fwd(x, eps)[0]


def _layer_norm_fwd(x, eps):
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  rstd = jax.lax.rsqrt(var + eps)
  y = (x32 - mean) * rstd
  return y.astype(x.dtype), (y, rstd)


def _layer_norm_bwd(eps, residuals, g):
  del eps
  y, rstd = residuals
  g32 = g.astype(jnp.float32)
  dx = rstd * (g32 - jnp.mean(g32, axis=-1, keepdims=True) - y * jnp.mean(g32 * y, axis=-1, keepdims=True))
  return (dx.astype(g.dtype),)


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """adaLN modulation; shift and scale are per image [B, D], broadcast over tokens."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


_GELU_C = 0.7978845608028654  # sqrt(2 / pi)
_GELU_A = 0.044715


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
  """GELU with the tanh approximation, as in DiT and PixArt-alpha: x/2 (1 + tanh(c (x + a x^3))).

  The gradient is its closed form from the saved input alone, one fused pass
  that recomputes tanh (`_gelu_bwd`): autodiff keeps tanh as a residual and splits
  the backward into several passes over the [rows, hidden] activations, the
  largest tensors of the step and memory-bound on a CPU. Values equal
  `jax.nn.gelu(x, approximate=True)` up to float rounding (tests/test_primitives.py).
  """
  return _gelu_fwd(x)[0]


def _gelu_fwd(x):
  return jax.nn.gelu(x, approximate=True), x


def _gelu_bwd(x, g):
  x32 = x.astype(jnp.float32)
  x2 = x32 * x32
  t = jnp.tanh(_GELU_C * x32 * (1 + _GELU_A * x2))
  dgelu = 0.5 * (1 + t) + 0.5 * x32 * (1 - t * t) * _GELU_C * (1 + 3 * _GELU_A * x2)
  return ((g.astype(jnp.float32) * dgelu).astype(g.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


def softmax(x: jax.Array) -> jax.Array:
  """Softmax over the last axis, in float32, with the closed-form gradient p * (g - sum(g * p)).

  The forward equals `jax.nn.softmax(x, axis=-1)`; the backward keeps only the
  probabilities p, one fused pass over the [B, N, T, S] attention weights, where
  autodiff of exp and divide keeps the exponentials and a materialised
  broadcast of 1 / sum for several passes (tests/test_primitives.py).
  """
  return _softmax(x.astype(jnp.float32))


@jax.custom_vjp
def _softmax(x):
  return _softmax_fwd(x)[0]


def _softmax_fwd(x):
  e = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
  p = e / jnp.sum(e, axis=-1, keepdims=True)
  return p, p


def _softmax_bwd(p, g):
  return (p * (g - jnp.sum(g * p, axis=-1, keepdims=True)),)


_softmax.defvjp(_softmax_fwd, _softmax_bwd)


def compute_dtype(name: str):
  """Maps the config's dtype name to a jnp dtype."""
  table = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
  if name not in table:
    raise ValueError(f"dtype must be one of {sorted(table)}, got {name!r}")
  return table[name]
