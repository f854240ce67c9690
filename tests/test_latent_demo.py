"""docs/latent_data.md's CPU walk-through, command by command (fewer images and steps): random encoders ->
a folder of captioned images -> prepare -> train (with the final grid) -> sample -> evaluate."""

import json
import os
import subprocess
import sys

from PIL import Image

from helpers import REPO

ENV = dict(os.environ, PYTHONPATH=str(REPO))


def _run(*args):
  out = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, (args, out.stderr[-3000:])
  return out


def test_latent_demo_walkthrough(tmp_path):
  d = tmp_path
  _run("ec_dit.tools.random_encoders", f"--out={d / 'encoders'}")
  assert {p.name for p in (d / "encoders" / "t5").iterdir()} == {"config.json", "model.safetensors", "spiece.model"}
  assert {p.name for p in (d / "encoders" / "vae").iterdir()} == {"config.json",
                                                                  "diffusion_pytorch_model.safetensors"}
  _run("ec_dit.tools.shapes_folder", f"--out={d / 'images'}", "--n=48")
  enc = [f"--config.encoders.t5_path={d / 'encoders' / 't5'}", f"--config.encoders.vae_path={d / 'encoders' / 'vae'}"]
  config = "--config=configs/ec_dit_latent_demo.py"
  _run("ec_dit.prepare", config, f"--source=folder:{d / 'images'}", f"--out={d / 'prepared'}", *enc)
  manifest = json.loads((d / "prepared" / "manifest.json").read_text())
  assert manifest["num_examples"] == 48 and manifest["latent_shape"] == [8, 8, 4] and manifest["feature_dim"] == 64
  run = d / "run"
  out = _run("ec_dit.main", config, f"--workdir={run}", "--mode=train", f"--config.input.source=latents:{d / 'prepared'}",
             "--config.num_train_steps=4", "--config.eval_every_steps=100", "--config.sample.num_steps=2",
             *enc)
  assert "wrote:" in out.stderr and (run / "samples" / "step_0000004.png").is_file()  # the final grid
  assert (run / "routing_maps" / "step_0000004.png").is_file()
  out = _run("ec_dit.main", f"--workdir={run}", "--mode=sample", "--prompt=a photo of a red circle", "--num_images=2",
             "--config.sample.num_steps=2")
  paths = out.stdout.split()
  assert len(paths) == 2 and Image.open(paths[0]).size == (64, 64)
  out = _run("ec_dit.main", f"--workdir={run}", "--mode=evaluate", "--config.geneval.per_task=1",
             "--config.sample.num_steps=2")
  summary = json.loads((run / "geneval" / "summary.json").read_text())
  assert 0.0 <= summary["overall"] <= 1.0
  assert json.loads(out.stdout.strip().splitlines()[-1])["overall"] == summary["overall"]  # the table's JSON line
