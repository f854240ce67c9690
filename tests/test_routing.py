"""Golden values and invariants of the pure routing primitives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ec_dit import moe

PROBS = jnp.array([[[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5]]], jnp.float32)  # [G=1, S=4, E=2]


def test_expert_choice_golden():
  gates, idx = moe.expert_choice(PROBS, capacity=2)
  np.testing.assert_array_equal(idx, [[[0, 2], [1, 3]]])
  np.testing.assert_allclose(gates, [[[0.9, 0.6], [0.8, 0.5]]])
  assert gates.dtype == jnp.float32 and idx.dtype == jnp.int32


def test_token_choice_golden_and_tie_break():
  gates, idx = moe.token_choice(PROBS, k=1)
  np.testing.assert_array_equal(idx[..., 0], [[0, 1, 0, 0]])  # the 0.5/0.5 tie goes to expert 0
  np.testing.assert_allclose(gates[..., 0], [[0.9, 0.8, 0.6, 0.5]])
  gates2, idx2 = moe.token_choice(PROBS, k=2)
  assert gates2.shape == (1, 4, 2)
  np.testing.assert_array_equal(np.sort(idx2, axis=-1), np.tile([0, 1], (1, 4, 1)))


def test_balance_loss_golden():
  _, idx = moe.token_choice(PROBS, k=1)
  # counts [3, 1] -> f = 2 * [3, 1] / 4 = [1.5, 0.5]; P = [0.55, 0.45]
  np.testing.assert_allclose(moe.balance_loss(PROBS, idx, 2), 1.5 * 0.55 + 0.5 * 0.45, rtol=1e-6)
  uniform = jnp.full((2, 8, 4), 0.25)
  idx = jnp.tile(jnp.arange(4)[None, :, None], (2, 2, 2)) % 4  # every expert chosen equally
  np.testing.assert_allclose(moe.balance_loss(uniform, idx, 4), 1.0, rtol=1e-6)


@pytest.mark.parametrize("s,cf,e,expected", [(256, 2.0, 32, 16), (256, 1.0, 32, 8), (10, 2.0, 8, 3),
                                             (10, 2.5, 8, 3), (4, 0.1, 8, 1), (4, 8.0, 2, 4), (12, 1.0, 8, 2)])
def test_capacity_rule(s, cf, e, expected):
  assert moe.capacity(s, cf, e) == expected


def test_capacity_rejects_non_positive_factor():
  with pytest.raises(ValueError, match="capacity_factor"):
    moe.capacity(16, 0.0, 4)


def test_every_expert_takes_exactly_c_distinct_tokens():
  probs = jax.nn.softmax(jax.random.normal(jax.random.key(0), (3, 64, 8)), axis=-1)
  c = moe.capacity(64, 2.0, 8)
  gates, idx = moe.expert_choice(probs, c)
  assert idx.shape == (3, 8, c)
  for g in range(3):
    for e in range(8):
      assert len(set(np.asarray(idx[g, e]).tolist())) == c  # C distinct tokens
      top = np.sort(np.asarray(probs[g, :, e]))[::-1][:c]
      np.testing.assert_allclose(gates[g, e], top)  # and they are that expert's top C


def test_token_choice_slots_respect_capacity_and_priority():
  probs = jax.nn.softmax(jax.random.normal(jax.random.key(1), (2, 32, 4)) * 3, axis=-1)
  gates, experts = moe.token_choice(probs, 2)
  slots = moe.token_choice_slots(gates, experts, 4, capacity=6)
  assert slots.gates.shape == (2, 4, 6)
  for g in range(2):
    kept = set()
    for e in range(4):
      toks = np.asarray(slots.token_indices[g, e])[np.asarray(slots.valid[g, e])]
      assert len(toks) <= 6
      for s in toks:
        assert e in np.asarray(experts[g, s])  # only tokens that chose e
        kept.add((int(s), e))
    # first choices are placed before any second choice: an expert that holds a
    # second choice holds every first choice made for it.
    for e in range(4):
      first = {s for s in range(32) if int(experts[g, s, 0]) == e}
      second_held = any(int(experts[g, s, 1]) == e and (s, e) in kept for s in range(32))
      if second_held:
        assert first <= {s for s, ee in kept if ee == e}


def test_router_z_loss_golden():
  logits = jnp.array([[0.0, 0.0], [1.0, 1.0]])
  expected = np.mean(np.square([np.log(2.0), 1 + np.log(2.0)]))
  np.testing.assert_allclose(moe.router_z_loss(logits), expected, rtol=1e-6)
