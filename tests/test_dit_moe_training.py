"""DiT-MoE in the product: a converted checkpoint continues training from prepared latents with class
labels (`ec_dit.training.loop` dispatching on `config.model.arch`), and `--mode=sample --class_label`.

The prepared folder is made here: a tiny random VAE (tests/latent_fixtures.py), ImageNet-style class
subfolders, and `ec_dit.prepare.dataset.prepare_dataset` with a class-conditional config (no T5).
"""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from PIL import Image

from ec_dit import checkpoint, evaluators, tasks
from ec_dit.convert import __main__ as convert_cli, dit_moe as convert
from ec_dit.data import latents, pipeline as data_pipeline
from ec_dit.inference.class_to_image import sample_to_files
from ec_dit.model import dit_moe
from ec_dit.tools import compile_report, model_summary
from ec_dit.training import loop
from dit_moe_fixtures import CHECKPOINT, class_config, prepare_class_latents, state_dict, tiny_config
from helpers import REPO, load_config
from test_dit_moe import REFERENCE_PARAMS

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """(prepared folder, vae folder): latents and labels of 12 images in 3 classes, no T5 features."""
  return prepare_class_latents(tmp_path_factory.mktemp("dit_moe_latents"))


def test_prepared_class_folder_yields_latents_and_labels(prepared):
  folder, _ = prepared
  ds = data_pipeline.create_dataset(class_config(input__source=f"latents:{folder}").input, batch_size=12, tokenize=None,
                                    seed=0, num_epochs=1)
  batch = next(iter(ds))
  assert batch["latent_mean"].shape == (12, 8, 8, 4) and batch["features"].shape[-1] == 0
  assert sorted(batch["label"].tolist()) == [0] * 4 + [1] * 4 + [2] * 4
  text_config = class_config()
  text_config.model.arch = "ec_dit"
  with pytest.raises(ValueError, match="config.model.context_dim: .* has 0.*prepared without T5"):
    latents.check_compatible(latents.read_manifest(folder), text_config.model)


def _convert(tmp_path):
  config_file = tmp_path / "tiny_dit_moe.py"
  config_file.write_text(
      "import sys\nsys.path.insert(0, %r)\nfrom dit_moe_fixtures import tiny_config\n"
      "def get_config(arg=None):\n  c = tiny_config()\n  c.class_diffusion.num_sampling_steps = 3\n  return c\n"
      % str(CHECKPOINT.parents[2]))
  out = tmp_path / "run"
  assert convert_cli.main(["dit_moe", "--checkpoint", str(CHECKPOINT), "--config", str(config_file),
                           "--out", str(out)]) == 0
  return out


def test_converted_run_continues_training_from_prepared_latents_then_samples(prepared, tmp_path, capsys):
  folder, vae = prepared
  run = _convert(tmp_path)
  # the converter's config has another source and batch size: fine for a checkpoint without a data iterator
  config = class_config(input__source=f"latents:{folder}")
  result = evaluators.train_and_evaluate(config, str(run))
  err = capsys.readouterr().err
  assert "holds no data iterator" in err and "resumed from step 0" in err and "no GenEval" in err
  assert np.isfinite(result["loss"]) and result["vb"] > 0 and result["aux_loss"] > 0
  assert checkpoint.saved_steps(str(run)) == [0, 2]
  rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2] and "moe/layer_01/balance_loss" in rows[0]
  # continued from the imported weights: two Adam steps of lr 1e-4 move each weight by at most ~2e-4
  imported = convert.convert_state_dict(state_dict(), tiny_config())
  trained = checkpoint.restore_ema(str(run), tasks.task_for(config).abstract_params(config))
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), trained, imported)
  assert 0 < max(jax.tree.leaves(moved)) < 5e-4
  assert (run / "checkpoints" / "2" / "data_iter").is_dir()  # the continued run saves its iterator
  # sample: latents as .npy without a VAE path, PNGs with one
  paths = sample_to_files(str(run), [3], num_images=2, report=lambda text: None)
  assert [p.rsplit("/", 1)[1] for p in paths] == ["class_3_0_0.npy", "class_3_0_1.npy"]
  assert np.load(paths[0]).shape == (8, 8, 4)
  # no --config: the run's own (configs/dit_moe.py:S-8E2A, another model, would be refused)
  proc = subprocess.run([sys.executable, "-m", "ec_dit.main",
                         f"--workdir={run}", "--mode=sample", "--class_label=1", "--class_label=5", "--num_images=1",
                         f"--config.encoders.vae_path={vae}"], capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  pngs = proc.stdout.split()
  assert [p.rsplit("/", 1)[1] for p in pngs] == ["class_1_0_0.png", "class_5_0_0.png"]

  assert Image.open(pngs[0]).size == (16, 16)


def test_class_conditional_run_needs_labelled_latents(tmp_path):
  with pytest.raises(ValueError, match="config.input.source: model.arch='dit_moe' trains on prepared latents"):
    loop.train(class_config(), str(tmp_path / "run"))


def test_summary_counts_equal_the_reference_and_the_class_conditional_step_compiles():
  config = load_config("dit_moe", "S-8E2A")
  stats = model_summary.summarize(config.model)
  assert stats["reference_params"] == REFERENCE_PARAMS["S-8E2A"][0] and stats["num_moe_layers"] == 12
  assert stats["total_params"] == stats["reference_params"] - 256 * 384
  config = class_config(batch_size=8, mesh__expert=8, model__ffn__num_experts=8)
  report = compile_report.memory_report(config)
  assert report["mesh"]["expert"] == 8 and report["num_params"] == dit_moe.count_params(config)
