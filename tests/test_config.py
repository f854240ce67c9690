"""Configs: the paper sizes, variants, validation errors, and the summary mode."""

import json
import subprocess
import sys

import pytest

from ec_dit import configs, data, inference, schema, tasks, tokenizer as tokenizer_lib
from ec_dit.geneval import prompts
from ec_dit.tools import model_summary
from helpers import REPO, load_config, base_test_config


@pytest.mark.parametrize("name,d,depth,heads,experts", [
    ("ec_dit_xl", 1152, 28, 18, 32), ("ec_dit_xxl", 1536, 38, 24, 32),
    ("ec_dit_3xl", 2304, 42, 36, 32), ("ec_dit_m", 3072, 38, 48, 64)])
def test_paper_configs(name, d, depth, heads, experts):
  config = load_config(name)
  tasks.validate(config)
  m = config.model
  assert (m.hidden_size, m.depth, m.num_heads, m.ffn.num_experts) == (d, depth, heads, experts)
  assert (m.input_size, m.in_channels, m.patch_size) == (32, 4, 2)
  assert m.ffn.kind == "expert_choice" and m.ffn.train_capacity_factor == 2.0 and m.ffn.moe_every == 2


@pytest.mark.parametrize("variant,kind", [(None, "expert_choice"), ("tc", "token_choice"), ("dense", "dense"),
                                          ("dit_moe", "token_choice")])
def test_tiny_variants_validate(variant, kind):
  config = load_config("ec_dit_tiny", variant)
  tasks.validate(config)
  assert config.model.ffn.kind == kind


def test_unknown_variant_is_rejected():
  with pytest.raises(ValueError, match="variant must be one of"):
    load_config("ec_dit_tiny", "moe9000")


def _set(config, dotted, value):
  *parents, leaf = dotted.split(".")
  node = config
  for p in parents:
    node = node[p]
  with node.unlocked() if hasattr(node, "unlocked") else nullcontext():
    node[leaf] = value


from contextlib import nullcontext  # noqa: E402


@pytest.mark.parametrize("field,value,message", [
    ("model.input_size", 33, r"config\.model\.input_size: must be divisible by patch_size=4"),
    ("model.hidden_size", 130, r"config\.model\.hidden_size: must be divisible by num_heads=4"),
    ("model.ffn.train_capacity_factor", 0.0, r"config\.model\.ffn\.train_capacity_factor: must be > 0"),
    ("model.ffn.eval_capacity_factor", -1.0, r"config\.model\.ffn\.eval_capacity_factor: must be > 0"),
    ("model.ffn.kind", "switch", r"config\.model\.ffn\.kind: must be one of \('dense', 'expert_choice', 'token_choice'\)"),
    ("model.ffn.dispatch", "magic", r"config\.model\.ffn\.dispatch: must be one of"),
    ("model.ffn.routing_group_size", 100, r"config\.model\.ffn\.routing_group_size"),
    ("model.dtype", "float16", r"config\.model\.dtype: must be one of"),
    ("model.prediction", "eps", r"config\.model\.prediction: must be one of \('velocity', 'x0', 'epsilon'\)"),
    # training, text, diffusion, sampling and GenEval fields fail before anything is built
    ("num_train_steps", -5, r"config\.num_train_steps: must be an integer >= 0, got -5"),
    ("batch_size", 0, r"config\.batch_size: must be an integer >= 1"),
    ("learning_rate", -1e-3, r"config\.learning_rate: must be a number in \(0\.0, inf\]"),
    ("adam_b2", 1.0, r"config\.adam_b2: must be a number in \[0\.0, 1\.0\)"),
    ("ema_decay", 1.5, r"config\.ema_decay: must be a number in \[0\.0, 1\.0\]"),
    ("eval_every_steps", -1, r"config\.eval_every_steps: must be an integer >= 0"),
    ("text.tokenizer", "bpe", r"config\.text\.tokenizer: must be one of \('words', 'bytes'\)"),
    ("text.num_heads", 3, r"config\.text\.num_heads: must be a divisor of model\.context_dim=128"),
    ("diffusion.uncond_prob", 1.0, r"config\.diffusion\.uncond_prob: must be a number in \[0\.0, 1\.0\)"),
    ("diffusion.t_std", 0.0, r"config\.diffusion\.t_std: must be a number in \(0\.0, inf\]"),
    ("diffusion.loss_t_min", 1.5, r"config\.diffusion\.loss_t_min: must be a number in \[0\.0, 1\.0\]"),
    ("sample.sampler", "dpm", r"config\.sample\.sampler: must be one of \('euler', 'heun', 'ancestral'\)"),
    ("sample.num_steps", 0, r"config\.sample\.num_steps: must be an integer >= 1"),
    ("sample.guidance_parallel", 1.5, r"config\.sample\.guidance_parallel: must be a number in \[0\.0, 1\.0\]"),
    ("sample.prompts", ("a red circle", 3), r"config\.sample\.prompts: must be a list of strings"),
    ("geneval.domain", "imagenet", r"config\.geneval\.domain: must be one of \('shapes', 'coco'\)"),
    ("geneval.images_per_prompt", 0, r"config\.geneval\.images_per_prompt: must be an integer >= 1"),
    ("input.image_size", 4, r"config\.input\.image_size"),
])
def test_bad_configs_name_the_field(field, value, message):
  config = base_test_config()
  _set(config, field, value)
  with pytest.raises(ValueError, match=message):
    tasks.validate(config)


def test_cli_rejects_bad_sampler_before_training(tmp_path):
  """A typo in a sampling field fails at start-up, not after the whole training run."""
  out = subprocess.run([sys.executable, "-m", "ec_dit.main", "--config=tests/micro_config.py",
                        f"--workdir={tmp_path / 'run'}", "--config.sample.sampler=dpm"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert "config.sample.sampler: must be one of ('euler', 'heun', 'ancestral'), got 'dpm'" in out.stderr
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_top_k_larger_than_experts():
  config = base_test_config("tc")
  config.model.ffn.top_k = 9
  with pytest.raises(ValueError, match=r"config\.model\.ffn\.top_k: must be in \[1, num_experts=8\], got 9"):
    tasks.validate(config)


def test_unknown_keys_are_rejected():
  config = base_test_config()
  with config.model.ffn.unlocked():
    config.model.ffn.capacity = 3
  with pytest.raises(ValueError, match=r"config\.model\.ffn\.capacity: unknown key"):
    tasks.validate(config)
  config = base_test_config()
  with config.unlocked():
    config.trainer = {}
  with pytest.raises(ValueError, match=r"config\.trainer: unknown key"):
    tasks.validate(config)


def test_summary_of_xl_from_shapes_only():
  stats = model_summary.summarize(load_config("ec_dit_xl").model)
  assert stats["num_moe_layers"] == 14
  d, h, e = 1152, 4 * 1152, 32
  assert stats["expert_params"] == 14 * e * (2 * d * h + h + d)
  # activated: everything but the experts, plus 2 experts' worth (capacity factor 2) per MoE layer
  assert stats["activated_params_per_token"] == stats["total_params"] - stats["expert_params"] + 2 * 14 * (2 * d * h + h + d)
  assert 5.0e9 < stats["total_params"] < 6.0e9


def test_flops_match_xla_cost_analysis():
  import jax
  import jax.numpy as jnp
  from flax import nnx
  for variant in ("dense", "ec"):
    m = base_test_config(variant).model
    m.ffn.dispatch = "gather"  # the einsum dispatch's one-hot matmuls are bookkeeping, not model FLOPs
    graph, state = nnx.split(model_summary.abstract_dit(m))
    sds = jax.ShapeDtypeStruct
    args = (state, sds((1, 32, 32, 3), jnp.float32), sds((1,), jnp.float32),
            sds((1, m.context_len, m.context_dim), jnp.float32), sds((1, m.context_len), bool))
    cost = jax.jit(lambda s, *a: nnx.merge(graph, s)(*a)[0]).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    assert cost["flops"] == pytest.approx(model_summary.flops_per_image(m), rel=0.05)


def test_summary_cli_for_the_97b_config():
  out = subprocess.run([sys.executable, "-m", "ec_dit.main", "--config=configs/ec_dit_m.py", "--mode=summary"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  stats = json.loads(out.stdout.strip().splitlines()[-1])
  for key in ("total_params", "expert_params", "num_moe_layers", "activated_params_per_token", "flops_per_image"):
    assert key in stats
  assert 9.0e10 < stats["total_params"] < 1.0e11 and stats["num_moe_layers"] == 19
  assert "component" in out.stdout  # the human table comes first


def test_cli_rejects_bad_override_before_building():
  out = subprocess.run([sys.executable, "-m", "ec_dit.main", "--config=tests/micro_config.py", "--mode=summary",
                        "--config.model.ffn.kind=switch"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert "config.model.ffn.kind: must be one of" in out.stderr


def test_run_config_from_an_older_version_gets_new_keys_as_defaults(tmp_path):
  """A run saved before a key existed still loads: the key takes its default."""
  saved = base_test_config().to_dict()
  del saved["model"]["prediction"]
  saved["sample"]["prompts"] = ["a photo of a red circle"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  config = inference.load_run_config(str(tmp_path))
  assert config.model.prediction == schema.base_config().model.prediction
  assert list(config.sample.prompts) == ["a photo of a red circle"]  # saved values win
  tasks.validate(config)


def test_tiny_text_context_truncates_none_of_its_prompts():
  """The tiny config's 12-token context holds its training captions, its scored prompts and its grid prompts."""
  config = load_config("ec_dit_tiny")
  tokenizer = tokenizer_lib.tokenizer_from_config(config)
  suite = prompts.suite_from_config(config.geneval)
  source = data.make_source(config.input)
  captions = ([p["prompt"] for p in suite] + list(config.sample.prompts)
              + [source[i]["caption"] for i in range(300)])
  length, longest = max((len(tokenizer.pieces(c)), c) for c in captions)
  assert length <= config.model.context_len, longest


def test_applicable_model_shows_only_the_fields_the_model_reads():
  """The notebook prints `configs.applicable_model(config)`: no class_cond for a text model, no token-choice
  fields for expert choice, no expert fields for a dense FFN."""
  ec = configs.applicable_model(load_config("ec_dit_tiny"))
  assert "class_cond" not in ec and "train_capacity_factor" in ec.ffn and "top_k" not in ec.ffn
  tc = configs.applicable_model(load_config("ec_dit_tiny", "tc"))
  assert "top_k" in tc.ffn and "train_capacity_factor" not in tc.ffn
  dense = configs.applicable_model(load_config("ec_dit_tiny", "dense"))
  assert "num_experts" not in dense.ffn and "dense_mlp_ratio" in dense.ffn
  assert "class_cond" in configs.applicable_model(load_config("dit_moe", "S-8E2A"))
