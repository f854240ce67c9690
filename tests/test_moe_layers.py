"""MoE layers against a naive per-token loop, dispatch equivalence, batch independence, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ec_dit import moe
from ec_dit.moe import layers

D, H, E = 16, 32, 4


def _gelu(x):
  return np.asarray(jax.nn.gelu(jnp.asarray(x), approximate=True))


def _expert(layer, e, v):
  ex = layer.experts
  h = _gelu(v @ np.asarray(ex.wi[...])[e] + np.asarray(ex.bi[...])[e])
  return h @ np.asarray(ex.wo[...])[e] + np.asarray(ex.bo[...])[e]


def _probs(layer, r):
  logits = np.asarray(r, np.float64) @ np.asarray(layer.router.proj.kernel[...], np.float64)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True)


def naive_expert_choice(layer, x, r, capacity):
  """Per image: each expert takes its top-C tokens; sum gate * expert(token) per token."""
  x, r = np.asarray(x), np.asarray(r)
  y = np.zeros_like(x)
  for b in range(x.shape[0]):
    p = _probs(layer, r[b])
    for e in range(p.shape[1]):
      for s in np.argsort(-p[:, e], kind="stable")[:capacity]:
        y[b, s] += p[s, e] * _expert(layer, e, x[b, s])
  return y


def naive_token_choice(layer, x, r, k):
  x, r = np.asarray(x), np.asarray(r)
  y = np.zeros_like(x)
  for b in range(x.shape[0]):
    p = _probs(layer, r[b])
    for s in range(x.shape[1]):
      for e in np.argsort(-p[s], kind="stable")[:k]:
        y[b, s] += p[s, e] * _expert(layer, e, x[b, s])
      for shared in layer.shared:
        y[b, s] += np.asarray(shared(jnp.asarray(x[b, s][None, None]))[0])[0, 0]
  return y


def _inputs(b=2, s=12, seed=0):
  kx, kr = jax.random.split(jax.random.key(seed))
  return jax.random.normal(kx, (b, s, D)), jax.random.normal(kr, (b, s, D))


def _ec(dispatch="einsum", **kw):
  return layers.ExpertChoiceMoE(D, num_experts=E, hidden=H, dispatch=dispatch, rngs=nnx.Rngs(0), **kw)


@pytest.mark.parametrize("dispatch", ["einsum", "gather"])
def test_expert_choice_matches_naive_loop(dispatch):
  layer = _ec(dispatch)
  x, r = _inputs()
  y, diag = layer(x, r)
  c = moe.capacity(12, 2.0, E)
  np.testing.assert_allclose(y, naive_expert_choice(layer, x, r, c), atol=1e-5)
  np.testing.assert_allclose(np.sum(diag["experts_per_token"], axis=1), E * c)  # every expert exactly full
  np.testing.assert_allclose(diag["expert_usage"], np.full(E, 1 / E))


def test_dispatches_agree_on_random_inputs_and_gradients():
  a, b = _ec("einsum"), _ec("gather")
  x, r = _inputs(b=3, s=40, seed=3)
  ya, _ = a(x, r)
  yb, _ = b(x, r)
  np.testing.assert_allclose(ya, yb, atol=1e-5)
  ga = nnx.grad(lambda m: jnp.sum(m(x, r)[0] ** 2))(a)
  gb = nnx.grad(lambda m: jnp.sum(m(x, r)[0] ** 2))(b)
  for la, lb in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(la, lb, atol=1e-4, rtol=1e-4)


def test_unchosen_tokens_get_zero_and_count_as_dropped():
  layer = _ec(train_capacity_factor=0.25)  # C = round(12 * 0.25 / 4) = 1: 4 of 12 tokens at most
  x, r = _inputs()
  y, diag = layer(x, r)
  untouched = np.asarray(diag["experts_per_token"]) == 0
  assert untouched.sum() >= 8
  np.testing.assert_array_equal(np.asarray(y)[untouched], 0.0)
  np.testing.assert_allclose(diag["dropped_fraction"], untouched.mean())


def test_per_image_groups_make_output_independent_of_batch_mates():
  layer = _ec("gather")
  x, r = _inputs(b=3, s=16, seed=5)
  y_all, _ = layer(x, r)
  y_one, _ = layer(x[:1], r[:1])
  x2 = x.at[1:].set(jax.random.normal(jax.random.key(9), x[1:].shape))
  y_other, _ = layer(x2, r.at[1:].set(x2[1:]))
  np.testing.assert_allclose(y_all[:1], y_one, atol=1e-6)
  np.testing.assert_allclose(y_all[:1], y_other[:1], atol=1e-6)


def test_fixed_size_groups_span_images():
  layer = _ec("gather", group_size=32)  # two 16-token images per group
  x, r = _inputs(b=4, s=16, seed=6)
  y, diag = layer(x, r)
  c = moe.capacity(32, 2.0, E)
  counts = np.asarray(diag["experts_per_token"]).reshape(2, 32)
  np.testing.assert_allclose(counts.sum(1), E * c)
  # group 0 (images 0, 1) does not see images 2, 3
  y2, _ = layer(x.at[2:].set(0.0), r.at[2:].set(0.0))
  np.testing.assert_allclose(y[:2], y2[:2], atol=1e-6)
  with pytest.raises(ValueError, match="routing_group_size"):
    layer(x[:1, :8], r[:1, :8])


def test_whole_batch_group_routes_all_tokens_together():
  """routing_group_size=-1: one group of all B*S tokens, whatever B (the naive loop over one flat image)."""
  layer = _ec("gather", group_size=-1)
  x, r = _inputs(b=3, s=8, seed=7)
  y, diag = layer(x, r)
  c = moe.capacity(24, 2.0, E)
  np.testing.assert_allclose(np.sum(diag["experts_per_token"]), E * c)
  want = naive_expert_choice(layer, x.reshape(1, 24, D), r.reshape(1, 24, D), c).reshape(3, 8, D)
  np.testing.assert_allclose(y, want, atol=1e-5)
  # compute moves between images: an image whose tokens the router prefers takes more than its share
  r2 = r.at[0].multiply(4.0)
  _, diag2 = layer(x, r2)
  per_image = np.asarray(diag2["experts_per_token"]).sum(1)
  assert per_image.sum() == E * c and per_image.max() != per_image.min()
  y_two, _ = layer(x[:2], r[:2])  # another batch size is another single group, no error
  assert y_two.shape == (2, 8, D)


def test_train_and_eval_capacity_factors():
  layer = _ec(train_capacity_factor=2.0, eval_capacity_factor=1.0)
  assert layer.capacity(64) == 32
  layer.eval()
  assert layer.capacity(64) == 16
  x, r = _inputs(b=1, s=64)
  _, diag = layer(x, r)
  np.testing.assert_allclose(np.sum(diag["experts_per_token"]), E * 16)
  layer.train()
  assert layer.capacity(64) == 32


def test_token_choice_dropless_matches_naive_with_shared_experts():
  layer = layers.TokenChoiceMoE(D, num_experts=E, hidden=H, k=2, num_shared_experts=1, rngs=nnx.Rngs(1))
  x, r = _inputs(b=2, s=10)
  y, diag = layer(x, r)
  np.testing.assert_allclose(y, naive_token_choice(layer, x, r, 2), atol=1e-5)
  np.testing.assert_array_equal(diag["experts_per_token"], 2.0)  # exactly k routed, shared on top
  assert float(diag["balance_loss"]) > 0


@pytest.mark.parametrize("dispatch", ["einsum", "gather"])
def test_token_choice_with_capacity_takes_at_most_k(dispatch):
  layer = layers.TokenChoiceMoE(D, num_experts=E, hidden=H, k=2, capacity_factor=0.5, dispatch=dispatch,
                                rngs=nnx.Rngs(2))
  x, r = _inputs(b=2, s=24)
  y, diag = layer(x, r)
  counts = np.asarray(diag["experts_per_token"])
  assert counts.max() <= 2 and counts.min() >= 0
  assert counts.sum() <= 2 * E * moe.capacity(24 * 2, 0.5, E)
  assert float(diag["dropped_fraction"]) >= 0.0
  # tokens with both choices kept equal the dropless layer's output there
  layer.capacity_factor = 0.0
  y_full, _ = layer(x, r)
  both = counts == 2
  np.testing.assert_allclose(np.asarray(y)[both], np.asarray(y_full)[both], atol=1e-5)


def test_renormalized_gates_sum_to_one():
  layer = layers.TokenChoiceMoE(D, num_experts=E, hidden=H, k=2, renormalize_gates=True, rngs=nnx.Rngs(4))
  x, r = _inputs(b=1, s=6)
  # with every expert computing the same function, renormalised gates give exactly that function
  for name in ("wi", "bi", "wo", "bo"):
    p = getattr(layer.experts, name)
    p[...] = jnp.broadcast_to(p[...][:1], p[...].shape)
  y, _ = layer(x, r)
  np.testing.assert_allclose(y[0], np.stack([_expert(layer, 0, v) for v in np.asarray(x[0])]), atol=1e-5)


@pytest.mark.parametrize("kind", ["ec", "tc"])
def test_gradients_are_finite_and_reach_router_and_experts(kind):
  if kind == "ec":
    layer = _ec("gather")
  else:
    layer = layers.TokenChoiceMoE(D, num_experts=E, hidden=H, k=2, rngs=nnx.Rngs(3))
  x, r = _inputs()
  grads = nnx.grad(lambda m: jnp.sum(m(x, r)[0] ** 2))(layer)
  for leaf in jax.tree.leaves(grads):
    assert np.all(np.isfinite(leaf))
  assert float(jnp.abs(grads.router.proj.kernel[...]).sum()) > 0
  assert float(jnp.abs(grads.experts.wi[...]).sum()) > 0
  assert float(jnp.abs(grads.experts.wo[...]).sum()) > 0


def test_bfloat16_compute_keeps_router_in_float32():
  layer = layers.ExpertChoiceMoE(D, num_experts=E, hidden=H, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
  x, r = _inputs()
  y, diag = layer(x.astype(jnp.bfloat16), r.astype(jnp.bfloat16))
  assert y.dtype == jnp.bfloat16
  assert diag["router_prob_per_expert"].dtype == jnp.float32
  assert layer.experts.wi[...].dtype == jnp.float32  # parameters stay float32


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_expert_backward_never_transposes_hidden_activations(activation):
  # The experts' weight gradients contract over all of an expert's slots. Contracting
  # (group, slot) as two dims made XLA transpose the hidden-width activation gradient
  # to [E, H, G, C] (strided, ~16% of the layer's time on CPU at DiT-MoE-S/2).
  layer = layers.ExpertChoiceMoE(D, num_experts=E, hidden=H, activation=activation, dispatch="gather",
                                 rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(layer)
  x, r = _inputs(b=2, s=12)
  g, c = 2, layer.capacity(12)

  def loss(state, x, r):
    return jnp.sum(nnx.merge(graphdef, state)(x, r)[0] ** 2)

  hlo = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(state, x, r).compile().as_text()
  assert f"f32[{E},{c},{H}]" in hlo or f"f32[{E},{g * c},{H}]" in hlo  # the check sees the activations
  for shape in (f"f32[{E},{H},{g},{c}]", f"f32[{E},{H},{g * c}]"):
    assert shape not in hlo, f"a transposed [E, H, rows] activation ({shape}) in the compiled step"
