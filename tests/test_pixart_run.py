"""PixArt-alpha end to end: convert a diffusers checkpoint, sample it from the CLI, train 20 steps, resume bitwise.

The checkpoint is the diffusers-written fixture (tests/fixtures/pixart/pixart_tiny) with its caption projection
re-drawn for the test T5's width (32): the real file layout and names. The VAE downsamples by 8, as SD's.
"""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ec_dit.convert import __main__ as convert_cli
from ec_dit.inference import load_run_config
from ec_dit.prepare import dataset
from ec_dit.tools import random_encoders
from ec_dit.training import loop
from helpers import REPO, assert_resumes_bitwise
from latent_fixtures import VAE_CONFIG, write_image_folder, write_t5

PIXART = REPO / "tests" / "fixtures" / "pixart" / "pixart_tiny"
VAE8 = {**VAE_CONFIG, "block_out_channels": [8, 8, 8, 8], "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  root = tmp_path_factory.mktemp("pixart_run")
  random_encoders.write_vae(root / "vae", config=VAE8, seed=0)  # 8x downsampling, as SD's
  ckpt = root / "pixart"
  shutil.copytree(PIXART, ckpt)
  tensors = load_file(str(ckpt / "diffusion_pytorch_model.safetensors"))
  rng = np.random.default_rng(0)
  tensors["caption_projection.linear_1.weight"] = (rng.standard_normal((32, 32)) / 6).astype(np.float32)
  save_file(tensors, str(ckpt / "diffusion_pytorch_model.safetensors"))
  cfg = json.loads((ckpt / "config.json").read_text())
  (ckpt / "config.json").write_text(json.dumps({**cfg, "caption_channels": 32}))
  return {"t5": write_t5(root / "t5"), "vae": root / "vae", "images": write_image_folder(root / "images", n=24),
          "pixart": ckpt, "root": root}


def test_convert_sample_train_resume(assets, tmp_path):
  run = tmp_path / "run"
  assert convert_cli.main(["pixart", "--checkpoint", str(assets["pixart"]), "--out", str(run)]) == 0
  config = load_run_config(str(run))
  assert config.model.prediction == "epsilon" and config.input.image_size == 64  # 8x8 latents, the VAE's 8x
  encoders = [f"--config.encoders.t5_path={assets['t5']}", f"--config.encoders.vae_path={assets['vae']}"]
  out = subprocess.run([sys.executable, "-m", "ec_dit.main",  # no --config: the run's own
                        f"--workdir={run}", "--mode=sample", "--prompt=a photo of a red square", "--num_images=2",
                        *encoders], capture_output=True, text=True, cwd=REPO, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert len(out.stdout.strip().splitlines()) == 2  # DDIM, 50 steps, guidance 4.5 against T5("")

  config.encoders.t5_path, config.encoders.vae_path = str(assets["t5"]), str(assets["vae"])
  config.input.source, config.input.read_threads = f"folder:{assets['images']}", 0
  assert dataset.prepare_dataset(config, str(tmp_path / "latents"), examples_per_shard=8) is not None
  config.input.source = f"latents:{tmp_path / 'latents'}"
  config.batch_size, config.num_train_steps, config.warmup_steps = 4, 20, 2
  config.log_every_steps, config.checkpoint_every_steps, config.eval_every_steps = 1, 10, 0
  assert_resumes_bitwise(loop.train, config, run)
