"""Dropless grouped matmuls: the tiles path against ragged_dot and a naive per-row loop, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ec_dit import schema, tasks
from ec_dit.moe import grouped, layers

D, H, E = 8, 16, 4
# uneven, with empty experts, one expert holding every row, and many tiles for one expert (tile 8)
GROUP_SIZES = [(5, 0, 12, 7), (0, 24, 0, 0), (24, 0, 0, 0), (0, 0, 0, 24), (1, 1, 1, 21), (8, 8, 0, 8)]


def _experts(activation, use_bias, seed=0):
  ex = layers.Experts(E, D, H, activation=activation, use_bias=use_bias, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  for name in ("bi", "bo"):  # biases start at 0: make them matter
    p = getattr(ex, name)
    if p is not None:
      p[...] = jnp.asarray(rng.standard_normal(p[...].shape), jnp.float32)
  return ex


def _naive(ex, x_nd, expert_of_row):
  """Row by row: row n through expert expert_of_row[n]'s MLP, with that row's own copy of the weights."""
  w = {name: getattr(ex, name)[...][expert_of_row] for name in ("wi", "wg", "wo", "bi", "bo")
       if getattr(ex, name) is not None}
  h = jnp.einsum("nd,ndh->nh", x_nd, w["wi"]) + w.get("bi", 0.0)
  if "wg" in w:
    h = jax.nn.silu(jnp.einsum("nd,ndh->nh", x_nd, w["wg"])) * h
  else:
    h = jax.nn.gelu(h, approximate=True)
  return jnp.einsum("nh,nhd->nd", h, w["wo"]) + w.get("bo", 0.0)


def _loss_and_grads(ex, x_nd, expert_of_row, group_sizes, impl):
  """jit(value_and_grad) of a weighted sum of the outputs w.r.t. (expert params, x)."""
  graphdef, state = nnx.split(ex)
  probe = jnp.asarray(np.random.default_rng(7).standard_normal((x_nd.shape[0], D)), jnp.float32)

  def loss(state, x):
    m = nnx.merge(graphdef, state)
    y = _naive(m, x, expert_of_row) if impl == "naive" else m.ragged(x, jnp.asarray(expert_of_row), group_sizes,
                                                                     impl=impl)
    return jnp.sum(y * probe), y

  (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(state, x_nd)
  return y, grads


@pytest.mark.parametrize("activation,use_bias", [("swiglu", False), ("swiglu", True), ("gelu", True)])
@pytest.mark.parametrize("sizes", GROUP_SIZES)
def test_tiles_equal_ragged_dot_and_naive_in_values_and_gradients(activation, use_bias, sizes):
  ex = _experts(activation, use_bias)
  group_sizes = jnp.asarray(sizes, jnp.int32)
  expert_of_row = np.repeat(np.arange(E), sizes)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((sum(sizes), D)), jnp.float32)
  ref_y, (ref_params, ref_x) = _loss_and_grads(ex, x, expert_of_row, group_sizes, "naive")
  for impl in ("ragged_dot", "tiles"):
    y, (params, dx) = _loss_and_grads(ex, x, expert_of_row, group_sizes, impl)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5, err_msg=impl)
    np.testing.assert_allclose(dx, ref_x, rtol=1e-5, atol=1e-5, err_msg=impl)
    names = sorted(ref_params)
    assert sorted(params) == names and {"wi", "wo"} <= set(names)
    for name in names:
      np.testing.assert_allclose(params[name][...], ref_params[name][...], rtol=1e-5, atol=1e-5,
                                 err_msg=f"{impl} d{name}")
  # an empty expert's weights get no gradient
  for e in np.flatnonzero(np.asarray(sizes) == 0):
    assert not np.any(params["wi"][...][e]) and not np.any(params["wo"][...][e])


@pytest.mark.parametrize("tiles", [(1,), (3,), (16, 8, 4, 2)])
def test_tile_mlp_at_other_tile_sizes_equals_naive(monkeypatch, tiles):
  """The layer's fused tile loop with tiles overrunning into the next expert, or mixing sizes."""
  monkeypatch.setattr(grouped, "tile_sizes", lambda n, e: tiles)
  for activation in ("swiglu", "gelu"):
    ex = _experts(activation, use_bias=True)
    for sizes in [(5, 0, 12, 7), (1, 1, 1, 21)]:
      expert_of_row = np.repeat(np.arange(E), sizes)
      x = jnp.asarray(np.random.default_rng(2).standard_normal((sum(sizes), D)), jnp.float32)
      ref = _loss_and_grads(ex, x, expert_of_row, jnp.asarray(sizes, jnp.int32), "naive")
      got = _loss_and_grads(ex, x, expert_of_row, jnp.asarray(sizes, jnp.int32), "tiles")
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"{activation} {sizes}")


def _swiglu(u, g):
  return jax.nn.silu(g) * u


def _ragged_dot_mlp(x, sizes, params):
  """The SwiGLU expert MLP from three `ragged_dot`s (no biases): the reference of `tile_mlp`."""
  h = _swiglu(jax.lax.ragged_dot(x, params["wi"], sizes), jax.lax.ragged_dot(x, params["wg"], sizes))
  return jax.lax.ragged_dot(h, params["wo"], sizes)


def _random_params(rng):
  shapes = {"wi": (E, D, H), "wg": (E, D, H), "wo": (E, H, D)}
  params = {k: jnp.asarray(rng.standard_normal(shape), jnp.float32) for k, shape in shapes.items()}
  return {**params, "bi": None, "bo": None}


@pytest.mark.parametrize("tile", [1, 3, 8, 64, (12, 6, 3), (32, 16, 8, 4, 2, 1)])
def test_tile_mlp_equals_ragged_dot_at_any_tile_in_values_and_gradients(tile):
  """Tiles that end inside the next expert's rows, or past the last row, or mix sizes, change nothing."""
  rng = np.random.default_rng(tile if isinstance(tile, int) else len(tile))
  # group sizes are arguments: one compile per implementation, five routings
  grad_fns = [jax.jit(jax.value_and_grad(lambda x, p, sizes, probe, f=f: jnp.sum(f(x, p, sizes) * probe),
                                         argnums=(0, 1)))
              for f in (lambda x, p, sizes: grouped.tile_mlp(x, sizes, tile, p, _swiglu),
                        lambda x, p, sizes: _ragged_dot_mlp(x, sizes, p))]
  for _ in range(5):
    sizes = jnp.asarray(rng.multinomial(40, rng.dirichlet(np.full(E, 0.3))), jnp.int32)
    x = jnp.asarray(rng.standard_normal((40, D)), jnp.float32)
    params = _random_params(rng)
    probe = jnp.asarray(rng.standard_normal((40, D)), jnp.float32)
    results = [grad_fn(x, params, sizes, probe) for grad_fn in grad_fns]
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


def test_tile_mlp_matches_ragged_dot_when_rows_exceed_the_groups():
  """Rows past sum(group_sizes) are 0 and get no gradient, as ragged_dot gives them."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((10, D)), jnp.float32)
  params = _random_params(rng)
  sizes = jnp.asarray([3, 0, 2, 1], jnp.int32)
  y, vjp = jax.vjp(lambda x: grouped.tile_mlp(x, sizes, 2, params, _swiglu), x)
  np.testing.assert_allclose(y, _ragged_dot_mlp(x, sizes, params), rtol=1e-5, atol=1e-4)
  assert not np.any(np.asarray(y)[6:])
  assert not np.any(np.asarray(vjp(jnp.ones_like(y))[0])[6:])


def test_token_choice_layer_is_the_same_with_either_dropless_impl():
  x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 12, D)), jnp.float32)
  results = {}
  for impl in ("ragged_dot", "tiles"):
    layer = layers.TokenChoiceMoE(D, num_experts=E, hidden=H, k=2, activation="swiglu", dropless_impl=impl,
                                  rngs=nnx.Rngs(5))
    graphdef, state = nnx.split(layer)

    def loss(state, x):
      y, _ = nnx.merge(graphdef, state)(x, x)
      return jnp.sum(jnp.sin(y)), y

    results[impl] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(state, x)
  (_, y_ref), (p_ref, x_ref) = results["ragged_dot"]
  (_, y), (p, dx) = results["tiles"]
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, x_ref, rtol=1e-5, atol=1e-5)
  for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(p), jax.tree_util.tree_leaves_with_path(p_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  assert np.any(np.asarray(p["router"]["proj"]["kernel"][...]))  # the gates' gradient reaches the router


def test_auto_is_ragged_dot_on_tpu_only_and_bad_names_are_refused():
  assert grouped.resolve_impl("auto", "tpu") == "ragged_dot"
  assert grouped.resolve_impl("auto", "cpu") == grouped.resolve_impl("auto", "gpu") == "tiles"
  assert grouped.resolve_impl("ragged_dot", "cpu") == "ragged_dot"
  with pytest.raises(ValueError, match="dropless_impl"):
    layers.TokenChoiceMoE(D, num_experts=E, hidden=H, dropless_impl="megablocks", rngs=nnx.Rngs(0))
  config = schema.base_config()
  config.model.ffn.dropless_impl = "megablocks"
  with pytest.raises(ValueError, match=r"config\.model\.ffn\.dropless_impl: must be one of \('auto', 'ragged_dot', "
                                       r"'tiles'\), got 'megablocks'"):
    tasks.validate(config)


def test_tile_sizes_follow_rows_per_expert():
  assert grouped.tile_sizes(4096, 8) == (512, 256, 128, 64)  # DiT-MoE-S/2 at batch 8: n/e down to n/(8e)
  assert grouped.tile_sizes(4000, 8) == (256, 128, 64, 32)   # powers of two <= n/e and n/(8e)
  assert grouped.tile_sizes(256, 4) == (64, 32, 16, 8)
  assert grouped.tile_sizes(24, 4) == (8,)                    # at least 8
  assert grouped.tile_sizes(1 << 24, 8) == (1024,)           # at most 1024
  with pytest.raises(ValueError, match="half"):
    grouped.tile_mlp(jnp.zeros((8, D)), jnp.asarray([8, 0, 0, 0]), (8, 3), _random_params(np.random.default_rng(0)),
                     _swiglu)
