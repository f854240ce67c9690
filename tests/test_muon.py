"""Muon: Newton-Schulz orthogonalisation, grouping, parameter labels, optimizer wiring."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ec_dit import schema
from ec_dit.training import muon, optimizers, state as state_lib
from tests.helpers import train_config


def _singular_values(x):
  return np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)


@pytest.mark.parametrize("shape", [(16, 16), (8, 32)])
def test_newton_schulz_pushes_every_singular_value_towards_one(shape):
  # Badly conditioned input: singular values spread over two decades.
  rng = np.random.default_rng(0)
  u, _ = np.linalg.qr(rng.normal(size=(shape[0], shape[0])))
  v, _ = np.linalg.qr(rng.normal(size=(shape[1], shape[1])))
  s = np.geomspace(1e-2, 1.0, shape[0])
  x = (u * s) @ v[:shape[0]]
  out = muon.newton_schulz(jnp.asarray(x, jnp.float32)[None], steps=5)[0]
  sv = _singular_values(out)
  # The tuned quintic does not converge to exactly 1; it lands every value in about [0.7, 1.2].
  assert sv.min() > 0.6 and sv.max() < 1.25, sv
  # Same singular vectors, U f(S) V^T with f > 0: each direction keeps its sign.
  assert np.all(np.diag(u.T @ np.asarray(out, np.float64) @ v[:shape[0]].T) > 0.5)


def reference_newton_schulz(x, steps):
  """The iteration as Jordan et al. write it, on the m x n matrices."""
  a, b, c = muon.NS_COEFFS
  x = x / (jnp.sqrt(jnp.sum(x * x, axis=(1, 2), keepdims=True)) + 1e-7)
  for _ in range(steps):
    gram = x @ jnp.swapaxes(x, 1, 2)
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x


@pytest.mark.parametrize("shape,steps,gram", [((3, 32, 256), 3, True), ((2, 16, 48), 5, True),
                                              ((2, 32, 40), 3, False), ((2, 16, 16), 5, False)])
def test_newton_schulz_equals_the_plain_iteration(shape, steps, gram):
  x = jax.random.normal(jax.random.key(0), shape)
  x = x.at[:, :, :3].multiply(30.0)  # a few large singular values, many small ones
  assert muon._gram_is_cheaper(shape[1], shape[2], steps) == gram
  with jax.default_matmul_precision("highest"):
    np.testing.assert_allclose(muon.newton_schulz(x, steps), reference_newton_schulz(x, steps), rtol=1e-4, atol=2e-5)


def test_orthogonalize_groups_equal_to_one_matrix_at_a_time_and_matches_adamw_rms():
  rng = np.random.default_rng(1)
  tree = {"a": rng.normal(size=(16, 48)), "b": rng.normal(size=(48, 16)),  # transposed twin
          "c": rng.normal(size=(16, 16)), "experts": rng.normal(size=(3, 16, 48)),
          "d": rng.normal(size=(16, 48))}
  tree = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
  grouped = muon.orthogonalize(tree, steps=5)
  for name, x in tree.items():
    alone = muon.orthogonalize({name: x}, steps=5)[name]
    np.testing.assert_allclose(grouped[name], alone, rtol=1e-5, atol=1e-6, err_msg=name)
    assert grouped[name].shape == x.shape
  # A [48, 16] matrix is orthogonalised as its transpose.
  np.testing.assert_allclose(muon.orthogonalize({"b": tree["b"].T}, 5)["b"].T, grouped["b"], rtol=1e-5, atol=1e-6)
  # Experts are orthogonalised one by one, not as one [16, 144] matrix.
  np.testing.assert_allclose(grouped["experts"][2], muon.orthogonalize({"e": tree["experts"][2]}, 5)["e"],
                             rtol=1e-5, atol=1e-6)
  # RMS-matched to AdamW's ~0.2 whatever the shape.
  for name, u in grouped.items():
    rms = float(jnp.sqrt(jnp.mean(u ** 2)))
    assert 0.14 < rms < 0.26, (name, rms)


def test_scale_by_muon_is_orthogonalised_nesterov_momentum():
  g1 = {"w": jnp.asarray(np.random.default_rng(2).normal(size=(8, 24)), jnp.float32)}
  g2 = {"w": jnp.asarray(np.random.default_rng(3).normal(size=(8, 24)), jnp.float32)}
  tx = muon.scale_by_muon(beta=0.9, ns_steps=5)
  state = tx.init(g1)
  u1, state = tx.update(g1, state)
  np.testing.assert_allclose(u1["w"], muon.orthogonalize({"w": 1.9 * g1["w"]}, 5)["w"], rtol=1e-5, atol=1e-6)
  u2, state = tx.update(g2, state)
  mu = 0.9 * g1["w"] + g2["w"]
  np.testing.assert_allclose(state.mu["w"], mu, rtol=1e-6)
  np.testing.assert_allclose(u2["w"], muon.orthogonalize({"w": 0.9 * mu + g2["w"]}, 5)["w"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("experts", [True, False])
def test_param_labels_pick_the_hidden_matrices(experts):
  config = train_config(None)
  _, params = state_lib.init_model(config)
  labels = muon.param_labels(params, experts=experts)
  blocks = labels["dit"]["blocks"]
  assert blocks[0]["attn"]["qkv"]["kernel"] == "muon"
  assert blocks[0]["attn"]["qkv"]["bias"] == "adamw"
  assert blocks[0]["adaln"]["kernel"] == "muon"
  assert blocks[0]["cross_attn"]["kv"]["kernel"] == "muon"
  assert blocks[0]["ffn"]["wi"]["kernel"] == "muon"              # dense FFN
  assert blocks[1]["ffn"]["router"]["proj"]["kernel"] == "adamw"
  assert blocks[1]["ffn"]["experts"]["wi"] == ("muon" if experts else "adamw")
  assert blocks[1]["ffn"]["experts"]["bi"] == "adamw"
  assert labels["text"]["layers"][0]["qkv"]["kernel"] == "muon"
  for name in ("patch_embed", "final", "t_embed"):
    assert set(jax.tree.leaves(labels["dit"][name])) == {"adamw"}, name
  assert labels["text"]["embed"] == "adamw"


def test_muon_optimizer_trains_and_leaves_adamw_params_on_adamw():
  config = train_config(None, optimizer="muon", muon__experts=True, muon__ns_steps=5)
  tx = optimizers.make_optimizer(config)
  _, params = state_lib.init_model(config)
  grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.01, params)
  state = tx.init(params)
  updates, _ = tx.update(grads, state, params)
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  # The second step (the warmup starts at 0): Muon leaves move by Muon's RMS, the rest by Adam's lr x sign(g).
  state = tx.init(params)
  for _ in range(2):
    updates, state = tx.update(grads, state, params)
  lr = float(optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, 2, 6, 0.1 * config.learning_rate)(1))
  qkv = updates["dit"]["blocks"][0]["attn"]["qkv"]["kernel"]
  embed = updates["text"]["embed"]
  # A rank-one gradient orthogonalises to a rank-one matrix with singular value in ~[0.7, 1.2]:
  # its RMS is that x 0.2 x lr x sqrt(1 / min dim).
  ratio = float(jnp.sqrt(jnp.mean(qkv ** 2))) / (0.2 * lr / np.sqrt(min(qkv.shape)))
  assert 0.65 < ratio < 1.25, ratio
  assert float(jnp.max(jnp.abs(embed))) == pytest.approx(lr, rel=1e-3)


@pytest.mark.parametrize("field, value, match", [
    ("optimizer", "sgd", r"config\.optimizer: must be one of \('adamw', 'muon'\)"),
    ("muon__beta", 1.0, r"config\.muon\.beta"),
    ("muon__ns_steps", 0, r"config\.muon\.ns_steps"),
])
def test_bad_optimizer_fields_are_named(field, value, match):
  config = train_config(None, **{field: value})
  with pytest.raises(ValueError, match=match):
    schema.validate_training(config)
