"""DiT-MoE (feizc/DiT-MoE) in ec-dit: parameter counts, parity with the PyTorch reference, import, configs.

Reference outputs come from `tests/fixtures/dit_moe/make_fixtures.py` (run by hand
with torch and the reference code); CI compares against the committed fixtures.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ec_dit import schema, tasks
from ec_dit.convert import __main__ as convert_cli, dit_moe as convert
from ec_dit.inference.class_to_image import ClassToImagePipeline
from ec_dit.model import dit_moe
from dit_moe_fixtures import CHECKPOINT, apply, model_from, nchw, nhwc, reference, state_dict, tiny_config, tiny_model
from helpers import load_config

# Parameters of DiT-MoE's models.py at the released sizes (input_size=32, 1000 classes, top-2; XL and G
# with use_flash_attn=True as trained), obtained with torch on the meta device by
# `make_fixtures.py --param-counts` (sum of p.numel() over model.parameters()). The reference also counts
# its fixed sin-cos `pos_embed` (an nn.Parameter with requires_grad=False, 256 x hidden_size); here the
# positions are computed, not stored, so our count is the reference's without pos_embed.
REFERENCE_PARAMS = {  # variant: (reference total with pos_embed, hidden_size)
    "S-8E2A": (199_307_552, 384),
    "S-16E2A": (369_213_728, 384),
    "B-8E2A": (795_861_536, 768),
    "XL-8E2A": (4_168_172_192, 1152),
    "G-16E2A": (16_503_731_232, 1408),
}


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def count_from_shapes(config) -> int:
  """The model's parameter count from nnx.eval_shape: the network without blocks plus depth x one block.

  (Every block has the same shapes; building the 40-block G/2 abstractly takes half a minute on a busy CPU.
  `test_block_decomposition_equals_the_full_count` checks the decomposition on a whole model.)
  """
  depth = config.model.depth
  config.model.depth = 0
  rest = dit_moe.count_params(config)
  config.model.depth = depth
  block = nnx.eval_shape(lambda: dit_moe.DiTMoEBlock(config.model, rngs=nnx.Rngs(0)))
  return rest + depth * _count(nnx.state(block, nnx.Param))


@pytest.mark.parametrize("variant", sorted(REFERENCE_PARAMS))
def test_parameter_counts_equal_the_reference(variant):
  config = load_config("dit_moe", variant)
  tasks.validate(config)
  total, d = REFERENCE_PARAMS[variant]
  assert count_from_shapes(config) == total - 256 * d


def test_block_decomposition_equals_the_full_count():
  config = load_config("dit_moe", "S-8E2A-ec")  # expert choice: the same parameters as token choice
  assert dit_moe.count_params(config) == count_from_shapes(config) == REFERENCE_PARAMS["S-8E2A"][0] - 256 * 384


def test_parameters_carry_logical_axes_and_experts_shard_on_expert():
  params = nnx.state(dit_moe.abstract_model(tiny_config()), nnx.Param)
  for path, var in jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    axes = var.get_metadata().get("out_sharding")
    assert axes is not None and len(axes) == len(var.shape), jax.tree_util.keystr(path)
  experts = params["blocks"][0]["moe"]["routed"]["experts"]
  assert experts["wi"].get_metadata()["out_sharding"] == ("expert", "embed", "expert_mlp")
  assert "bi" not in experts and "bo" not in experts  # DiT-MoE's experts have no biases


def test_forward_and_balance_loss_equal_the_reference_in_training_mode():
  ref = reference()
  model = tiny_model()
  out, aux = apply(model, nhwc(ref["x"]), jnp.asarray(ref["t"], jnp.float32), jnp.asarray(ref["y"]),
                   jnp.asarray(ref["drop"] == 1))
  np.testing.assert_allclose(nchw(out), ref["out_train"], atol=1e-4, rtol=0)
  balance = [0.01 * float(aux["moe"][k]["balance_loss"]) for k in sorted(aux["moe"])]
  np.testing.assert_allclose(balance, ref["balance_train"], atol=1e-6, rtol=1e-5)
  np.testing.assert_allclose(float(aux["aux_loss"]), ref["balance_train"].sum(), rtol=1e-5)


def test_forward_equals_the_reference_in_eval_mode_without_balance_loss():
  ref = reference()
  model = tiny_model()
  model.eval()
  out, aux = apply(model, nhwc(ref["x"]), jnp.asarray(ref["t"], jnp.float32), jnp.asarray(ref["y"]))
  np.testing.assert_allclose(nchw(out), ref["out_eval"], atol=1e-4, rtol=0)
  assert float(aux["aux_loss"]) == 0.0  # the reference computes no aux loss outside training
  # training mode only differs by the label dropout (example 1's label was dropped there)
  assert not np.allclose(ref["out_eval"][1], ref["out_train"][1]) and np.allclose(ref["out_eval"][0],
                                                                                  ref["out_train"][0])


def test_flash_attention_variant_equals_the_reference():
  """XL/G's blocks (attn.Wqkv, q_norm, k_norm, out_proj). The reference casts q and k to float16 before
  attention (`.half()` in FlashSelfMHAModified), hence the looser tolerance."""
  ref = reference()
  config = tiny_config(qk_norm=True)
  sd = {k.replace("attn.qkv.", "attn.Wqkv.").replace("attn.proj.", "attn.out_proj."): v for k, v in state_dict().items()}
  for i in range(2):
    for norm in ("q_norm", "k_norm"):
      for part in ("weight", "bias"):
        sd[f"blocks.{i}.attn.{norm}.{part}"] = ref[f"flash_{i}_{norm}_{part}"]
  model = model_from(convert.convert_state_dict(sd, config), config)
  model.eval()
  out, _ = apply(model, nhwc(ref["x"]), jnp.asarray(ref["t"], jnp.float32), jnp.asarray(ref["y"]))
  err = np.abs(nchw(out) - ref["out_eval_flash"]).max()
  assert err < 5e-3, err
  assert np.abs(ref["out_eval_flash"] - ref["out_eval"]).max() > 50 * err  # q/k norms matter: the test has teeth


def test_the_same_weights_route_by_expert_choice():
  ref = reference()
  config = tiny_config("expert_choice")
  model = tiny_model(config)
  model.eval()
  out, aux = apply(model, nhwc(ref["x"]), jnp.asarray(ref["t"], jnp.float32), jnp.asarray(ref["y"]))
  assert out.shape == (4, 8, 8, 8) and np.isfinite(np.asarray(out)).all()
  assert "balance_loss" not in aux["moe"]["layer_00"]
  assert not np.allclose(nchw(out), ref["out_eval"], atol=1e-3)


@pytest.mark.parametrize("edit,match", [
    (lambda sd: sd.pop("blocks.1.attn.qkv.bias"), r"missing 1 keys.*blocks\.1\.attn\.qkv\.bias"),
    (lambda sd: sd.__setitem__("blocks.0.extra.weight", np.zeros(3)), r"1 unexpected keys.*blocks\.0\.extra\.weight"),
    (lambda sd: sd.__setitem__("blocks.0.adaLN_modulation.1.bias", np.zeros(7, np.float32)),
     r"shape mismatches.*\['blocks'\]\[0\]\['adaln'\]\['bias'\]: checkpoint \(7,\), config \(384,\)"),
    (lambda sd: [sd.pop(k) for k in list(sd) if ".experts.3." in k],
     "the checkpoint has 3 experts per block, config.model.ffn.num_experts=4"),
    (lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("blocks.1.")],
     "the checkpoint has 1 blocks, config.model.depth=2"),
])
def test_mismatched_checkpoints_are_named(edit, match):
  sd = state_dict()
  edit(sd)
  with pytest.raises(convert.CheckpointMismatch, match=match):
    convert.convert_state_dict(sd, tiny_config())


def test_flash_checkpoint_with_a_timm_config_says_to_set_qk_norm():
  sd = {k.replace("attn.qkv.", "attn.Wqkv."): v for k, v in state_dict().items()}
  with pytest.raises(convert.CheckpointMismatch, match="set config.model.class_cond.qk_norm=True"):
    convert.convert_state_dict(sd, tiny_config())


def _tiny_config_file(tmp_path):
  path = tmp_path / "tiny_dit_moe.py"
  path.write_text(
      "import sys\nsys.path.insert(0, %r)\nfrom dit_moe_fixtures import tiny_config\n"
      "def get_config(arg=None):\n  c = tiny_config()\n  c.class_diffusion.num_sampling_steps = 3\n  return c\n"
      % str(CHECKPOINT.parents[2]))
  return path


def test_convert_writes_a_run_that_the_pipeline_samples(tmp_path):
  out = tmp_path / "run"
  rc = convert_cli.main(["dit_moe", "--checkpoint", str(CHECKPOINT), "--config", str(_tiny_config_file(tmp_path)),
                         "--out", str(out)])
  assert rc == 0 and (out / "checkpoints" / "0" / "ema").is_dir() and (out / "checkpoints" / "0" / "state").is_dir()
  assert json.loads((out / "config.json").read_text())["model"]["arch"] == "dit_moe"
  pipe = ClassToImagePipeline.from_run(str(out), batch_size=2)
  expected = convert.convert_state_dict(state_dict(), tiny_config())
  jax.tree.map(np.testing.assert_array_equal, pipe.params, expected)
  latents = pipe.generate([1, 5, 7], seed=0)
  assert latents.shape == (3, 8, 8, 4) and latents.dtype == np.float32 and np.isfinite(latents).all()
  # independent of batching: the same noise, floats at a batch of 1 vs 2 differ only in XLA:CPU's tiling
  np.testing.assert_allclose(pipe.generate([5], seed=0, first_index=1)[0], latents[1], rtol=1e-5, atol=1e-5)

  class FakeDecoder:  # FrozenEncoders.decode's contract: scaled latents -> uint8 images
    def decode(self, z):
      x = jnp.tanh(jnp.repeat(z[..., :3], 2, axis=1).repeat(2, axis=2))
      return np.asarray(jnp.round((x + 1.0) * 127.5), np.uint8)

  pipe.encoders = FakeDecoder()
  images = pipe.generate([1], seed=0)
  assert images.shape == (1, 16, 16, 3) and images.dtype == np.uint8
  with pytest.raises(FileExistsError, match="already holds checkpoints"):
    convert.write_run(tiny_config(), expected, str(out))


def test_convert_cli_reports_a_mismatch(tmp_path, capsys):
  config_file = tmp_path / "c.py"
  config_file.write_text(_tiny_config_file(tmp_path).read_text().replace("return c", "c.model.ffn.num_experts = 8\n  return c"))
  rc = convert_cli.main(["dit_moe", "--checkpoint", str(CHECKPOINT), "--config", str(config_file),
                         "--out", str(tmp_path / "run")])
  err = capsys.readouterr().err
  assert rc == 2 and "4 experts per block, config.model.ffn.num_experts=8" in err and err.count("\n") == 1


@pytest.mark.parametrize("field,value,match", [
    ("model.arch", "unet", "config.model.arch: must be one of"),
    ("model.ffn.activation", "gelu", "config.model.ffn.activation: must be 'swiglu'"),
    ("model.ffn.kind", "dense", "config.model.ffn.kind: must be one of"),
    ("model.ffn.moe_every", 2, "config.model.ffn.moe_every: must be 1"),
    ("model.class_cond.class_dropout", 1.0, r"config.model.class_cond.class_dropout: must be a number in \[0, 1\)"),
    ("model.class_cond.num_classes", 0, "config.model.class_cond.num_classes: must be a positive integer"),
    ("class_diffusion.objective", "edm", "config.class_diffusion.objective: must be one of"),
    ("class_diffusion.sampler", "euler", "config.class_diffusion.sampler: must be one of .* with objective='ddpm'"),
    ("class_diffusion.num_sampling_steps", 1001, r"num_sampling_steps: must be an integer in \[1, 1000\]"),
    ("class_diffusion.guidance_channels", 5, r"guidance_channels: must be an integer in \[0, model.in_channels=4\]"),
    ("class_diffusion.class_labels", (1, 1000), "class_labels: must be a list of integers in"),
])
def test_config_errors_name_the_field(field, value, match):
  config = load_config("dit_moe", "S-8E2A")
  node = config
  *parents, leaf = field.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ValueError, match=match):
    tasks.validate(config)


def test_released_configs_validate_and_unknown_variants_are_refused():
  for variant in list(REFERENCE_PARAMS) + ["XL-8E2A-ec"]:
    tasks.validate(load_config("dit_moe", variant))
  assert load_config("dit_moe", "XL-8E2A").model.class_cond.qk_norm
  assert load_config("dit_moe", "G-16E2A").class_diffusion.sampler == "euler"
  with pytest.raises(ValueError, match="variant must be one of"):
    load_config("dit_moe", "L-8E2A")
  tasks.validate(schema.base_config())  # the text-to-image default is untouched
  assert schema.base_config().model.arch == "ec_dit"
