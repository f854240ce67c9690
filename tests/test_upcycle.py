"""Sparse upcycling: experts copy the dense FFN; what it preserves for token choice, what changes for expert choice."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ec_dit import upcycle
from ec_dit.convert import __main__ as convert_cli, dit, pixart
from ec_dit.inference import load_run_config
from ec_dit.model import dit_moe, text_to_image
from ec_dit.training import optimizers
from ec_dit.upcycle import __main__ as upcycle_cli, run as upcycle_run

HERE = os.path.dirname(os.path.abspath(__file__))
PIXART = os.path.join(HERE, "fixtures", "pixart", "pixart_tiny")
DIT = os.path.join(HERE, "fixtures", "dit", "dit_diffusers")


def _model(config, params, builder):
  model = builder(config)
  nnx.update(model, params)
  model.eval()
  return model


def _mu(opt_state):
  """AdamW's first moments in an optax state."""
  return next(x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(x, "mu")).mu


def _pixart_inputs():
  ref = np.load(os.path.join(PIXART, "reference.npz"))
  return (jnp.asarray(ref["x"]), jnp.asarray(ref["t"], jnp.float32), jnp.asarray(ref["context"]),
          jnp.asarray(ref["mask"]))


@pytest.mark.parametrize("router_init", ["normal", "zeros"])
def test_token_choice_with_renormalised_gates_reproduces_the_dense_model(router_init):
  params, config = pixart.convert(PIXART)
  dense = _model(config, params, text_to_image.abstract_model)
  new = upcycle.upcycled_config(config, num_experts=4, routing="tc", top_k=2, router_init=router_init)
  assert new.model.ffn.renormalize_gates and new.upcycled.router_init == router_init
  moe = _model(new, upcycle.upcycle_params(params, config, new, seed=1), text_to_image.abstract_model)
  out_dense, _ = dense(*_pixart_inputs())
  out_moe, aux = moe(*_pixart_inputs())
  assert list(aux["moe"]) == ["layer_01"]  # every other layer (depth 2: the second)
  experts = moe.dit.blocks[1].ffn.experts
  np.testing.assert_array_equal(np.asarray(experts.wi[...][3]), params["dit"]["blocks"][1]["ffn"]["wi"]["kernel"])
  # the gates of a token sum to one and every expert is the dense FFN: the dense output, to float rounding
  np.testing.assert_allclose(np.asarray(out_moe), np.asarray(out_dense), atol=2e-6, rtol=0)


def test_expert_choice_starts_near_not_at_the_dense_model():
  """EC at init: y(token) = (sum of p_e(token) over the experts that picked it) x FFN(token).

  So a token no expert picks gets no FFN output, and a picked token's gates sum to less than one.
  """
  params, config = pixart.convert(PIXART)
  new = upcycle.upcycled_config(config, num_experts=4, routing="ec", capacity_factor=1.0)
  moe = _model(new, upcycle.upcycle_params(params, config, new, seed=0), text_to_image.abstract_model)
  dense = _model(config, params, text_to_image.abstract_model)
  layer, dense_ffn = moe.dit.blocks[1].ffn, dense.dit.blocks[1].ffn
  h = jax.random.normal(jax.random.key(0), (3, 16, 32))
  y, diag = layer(h, h)
  y_dense, _ = dense_ffn(h)
  probs = jax.nn.softmax(layer.router(h), axis=-1)
  gate_sum = jnp.sum(probs * diag["expert_choices"], axis=-1)  # [B, S]: sum of the picking experts' gates
  np.testing.assert_allclose(np.asarray(y), np.asarray(gate_sum[..., None] * y_dense), atol=1e-5, rtol=0)
  unpicked = np.asarray(diag["experts_per_token"] == 0)
  assert unpicked.any() and np.all(np.asarray(y)[unpicked] == 0)
  picked_sums = np.asarray(gate_sum)[~unpicked]
  assert picked_sums.max() < 1.0 and picked_sums.min() > 0.0
  out_moe, _ = moe(*_pixart_inputs())
  out_dense, _ = dense(*_pixart_inputs())
  assert np.abs(np.asarray(out_moe) - np.asarray(out_dense)).max() > 1e-3


def test_dit_upcycled_with_token_choice_reproduces_dense_dit():
  params, config = dit.convert(DIT)
  new = upcycle.upcycled_config(config, num_experts=4, routing="tc")
  moe = _model(new, upcycle.upcycle_params(params, config, new), dit_moe.abstract_model)
  dense = _model(config, params, dit_moe.abstract_model)
  ref = np.load(os.path.join(DIT, "reference.npz"))
  args = jnp.asarray(ref["x"]), jnp.asarray(ref["t"], jnp.float32), jnp.asarray(ref["y"])
  out_moe, aux = moe(*args)
  assert list(aux["moe"]) == ["layer_01"]
  np.testing.assert_allclose(np.asarray(out_moe), np.asarray(dense(*args)[0]), atol=2e-6, rtol=0)


def test_upcycle_run_carries_or_resets_the_optimizer_state(tmp_path):
  params, config = pixart.convert(PIXART)
  tx = optimizers.make_optimizer(config)
  rng = np.random.default_rng(0)
  opt_state = jax.tree.map(lambda a: rng.standard_normal(np.shape(a)).astype(np.asarray(a).dtype)
                           if np.ndim(a) else a, tx.init(params))
  dense_run, carried, reset = (str(tmp_path / n) for n in ("dense", "carried", "reset"))
  upcycle_run.dit_moe_convert.write_run(config, params, dense_run, opt_state=opt_state, step=7)
  assert upcycle_cli.main([dense_run, "--out", carried, "--experts", "4", "--routing", "ec",
                           "--optimizer_state", "carry"]) == 0
  new = load_run_config(carried)
  assert (new.upcycled.optimizer_state, new.upcycled.source_step, new.model.ffn.kind) == ("carry", 7, "expert_choice")
  step, new_params, new_opt, ema = upcycle_run.restore_state(new, carried)
  assert step == 7
  mu_old, mu_new = _mu(opt_state), _mu(new_opt)
  dense_mu = mu_old["dit"]["blocks"][1]["ffn"]["wi"]["kernel"]
  np.testing.assert_array_equal(mu_new["dit"]["blocks"][1]["ffn"]["experts"]["wi"][2], dense_mu)
  assert not np.any(mu_new["dit"]["blocks"][1]["ffn"]["router"]["proj"]["kernel"])
  np.testing.assert_array_equal(ema["dit"]["blocks"][1]["ffn"]["router"]["proj"]["kernel"],
                                new_params["dit"]["blocks"][1]["ffn"]["router"]["proj"]["kernel"])
  assert upcycle_cli.main([dense_run, "--out", reset, "--experts", "4", "--routing", "tc"]) == 0
  new = load_run_config(reset)
  step, _, new_opt, _ = upcycle_run.restore_state(new, reset)
  assert step == 0 and new.upcycled.optimizer_state == "reset"
  assert not np.any(_mu(new_opt)["dit"]["blocks"][0]["attn"]["qkv"]["kernel"])


def test_converter_upcycles_and_refuses_bad_options(tmp_path, capsys):
  out = str(tmp_path / "run")
  assert convert_cli.main(["dit", "--checkpoint", DIT, "--out", out, "--upcycle_experts", "4",
                           "--routing", "ec"]) == 0
  config = load_run_config(out)
  assert config.model.ffn.kind == "expert_choice" and config.upcycled.source.endswith("dit_diffusers")
  assert convert_cli.main(["pixart", "--checkpoint", PIXART, "--out", str(tmp_path / "r2"),
                           "--upcycle_experts", "4", "--moe_every", "0"]) == 2
  assert "moe_every" in capsys.readouterr().err
