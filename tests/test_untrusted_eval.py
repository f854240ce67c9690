"""Issue 27 items 4, 5, 8 and 9: routing maps of latent runs, GenEval scores that cannot be inflated from the
metadata, one-line errors naming the file, sample file names that cannot collide."""

import errno
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ec_dit import errors, inference
from ec_dit.routing_maps import trace as routing_trace
from ec_dit.encoders import hf_checkpoint
from ec_dit.geneval import prompts, reference
from ec_dit.geneval.cli import main as geneval
from helpers import REPO
from latent_fixtures import write_image_folder

ENV = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")


# -- 4. routing maps of a latent run: token weights on the latent grid, not the decoded pixels ---------------------

def test_expert_specialisation_sizes_tokens_from_the_latent_grid(monkeypatch):
  rng = np.random.default_rng(0)
  images = np.full((2, 16, 16, 3), 128, np.uint8)  # decoded pixels: 16x16 (a VAE upsamples the 8x8 latents x2)
  images[:, 2:6, 2:6] = (220, 40, 40)
  tokens = 16  # latent 8x8, patch 2: a 4x4 token grid (patch_size ** 2 per token would say 64 from the pixels)
  choices = {"layer_01": (rng.random((3, 2, tokens, 4)) < 0.5).astype(np.uint8)}
  trace = routing_trace.RoutingTrace(prompts=["a", "b"], images=images, ts=np.ones(3), experts_per_token={},
                                     expert_choices=choices, kind="expert_choice", num_experts=4, patch_size=2)
  monkeypatch.setattr(routing_trace, "trace_routing", lambda pipe, prompts, seed=0, **kw: trace)
  labels, counts = routing_trace.expert_specialisation(None, {"x": ["a"], "y": ["b"]}, region="all")
  np.testing.assert_array_equal(counts["layer_01"], choices["layer_01"].sum(axis=(0, 2)).astype(np.float32))
  _, objects = routing_trace.expert_specialisation(None, {"x": ["a"], "y": ["b"]}, region="objects")
  token_grid = choices["layer_01"].reshape(3, 2, 4, 4, 4)  # object pixels 2..5 fall in token rows/cols 0..1
  np.testing.assert_array_equal(objects["layer_01"], token_grid[:, :, :2, :2].sum(axis=(0, 2, 3)))


# -- 5. GenEval: tasks and clauses come from the reference prompts, never from the folder's metadata ---------------

@pytest.fixture
def rendered(tmp_path):
  pf, img = tmp_path / "p.jsonl", tmp_path / "img"
  prompts.write_prompts(prompts.generate_suite(prompts.DOMAINS["shapes"], 0, 1)[:6], str(pf))
  assert geneval(["render", "--prompts", str(pf), "--out", str(img), "--n", "2", "--quiet"]) == 0
  assert json.loads((img / reference.PROMPTS_FILE).read_text().splitlines()[0]) == prompts.load_prompts(str(pf))[0]
  return pf, img


def _edit_metadata(img, index, **changes):
  path = img / f"{index:05d}" / "metadata.jsonl"
  meta = {k: v for k, v in dict(json.loads(path.read_text()), **changes).items() if v is not None}
  path.write_text(json.dumps(meta) + "\n")
  return path


def test_metadata_cannot_inflate_the_scores(rendered, tmp_path, capsys):
  pf, img = rendered
  res = str(tmp_path / "r.jsonl")
  path = _edit_metadata(img, 1, include=None)  # no include: every image would be "correct"
  assert geneval(["evaluate", "--images", str(img), "--out", res, "--quiet"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and f"{path}" in err and "disagree with the reference prompts" in err
  os.remove(img / reference.PROMPTS_FILE)  # a copied folder without the prompts generate wrote
  assert geneval(["evaluate", "--images", str(img), "--out", res, "--quiet"]) == 2
  assert f"{path}: missing field 'include'" in capsys.readouterr().err
  _edit_metadata(img, 1, include=[{"class": "circle", "count": 1}], tag="sneaky")  # a seventh task
  assert geneval(["evaluate", "--images", str(img), "--out", res, "--quiet"]) == 2
  assert f"{path}: field 'tag' is 'sneaky'" in capsys.readouterr().err
  for i, p in enumerate(prompts.load_prompts(str(pf))):  # valid metadata of an unknown prompt set: no reference
    _edit_metadata(img, i, **p)
  assert geneval(["evaluate", "--images", str(img), "--out", res, "--quiet"]) == 2
  assert "pass --prompts FILE" in capsys.readouterr().err
  assert geneval(["evaluate", "--images", str(img), "--out", res, "--quiet", "--prompts", str(pf), "--n", "2"]) == 0
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["overall"] == 1.0


def test_the_shipped_prompt_sets_are_references(tmp_path):
  img = tmp_path / "img"
  suite = prompts.generate_suite(prompts.DOMAINS["coco"], 43, 100)
  assert len(suite) == 553  # GenEval's evaluation_metadata.jsonl
  for i in range(3):
    (img / f"{i:05d}").mkdir(parents=True)
    (img / f"{i:05d}" / "metadata.jsonl").write_text(json.dumps(suite[i]) + "\n")
  ps, source = reference.reference_prompts(str(img))
  assert ps == suite and source == "GenEval's official evaluation_metadata.jsonl"


# -- 8. evaluate names the corrupt PNG and the bad field's file; an extra sample is "extra", once ----------------

def test_evaluate_names_a_corrupt_png_and_reports_an_extra_sample_once(rendered, tmp_path, capsys):
  _, img = rendered
  res = str(tmp_path / "r.jsonl")
  shutil.copy(img / "00003" / "samples" / "0001.png", img / "00003" / "samples" / "0002.png")
  capsys.readouterr()
  assert geneval(["evaluate", "--images", str(img), "--out", res, "--quiet"]) == 1
  out = capsys.readouterr().out
  assert out.count("extra") == 1 and "00003/samples: extra 0002.png" in out and "missing 0" not in out, out
  os.remove(img / "00003" / "samples" / "0002.png")
  bad = img / "00002" / "samples" / "0001.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
  assert geneval(["evaluate", "--images", str(img), "--out", res, "--quiet"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith(f"error: {bad}: cannot read the image")


def test_a_count_that_is_not_a_number_names_the_file(rendered, tmp_path, capsys):
  _, img = rendered
  os.remove(img / reference.PROMPTS_FILE)
  path = _edit_metadata(img, 0, include=[{"class": "circle", "count": "three"}])
  assert geneval(["evaluate", "--images", str(img), "--out", str(tmp_path / "r.jsonl"), "--quiet"]) == 2
  assert f"{path}: field 'include[0].count': expected an integer, got 'three'" in capsys.readouterr().err


def test_encoder_path_and_bin_messages(tmp_path):
  file = tmp_path / "t5.safetensors"
  file.write_bytes(b"x")
  with pytest.raises(errors.CheckpointError, match=rf"{file}' is a file, not a folder"):
    hf_checkpoint.require_folder(file)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    hf_checkpoint.require_folder(tmp_path / "nope")
  if importlib.util.find_spec("torch") is None:  # CI: no torch, so .bin files get the safe conversion advice
    with pytest.raises(errors.CheckpointError, match=r"without running code from the file .*"
                                                     r"torch_pickle\.load\('pytorch_model\.bin'\)"):
      hf_checkpoint._bin_reader([str(tmp_path / "pytorch_model.bin")])


def test_a_full_disk_in_prepare_is_one_line_exit_2(tmp_path):
  images = write_image_folder(tmp_path / "im", n=4)
  t5, vae = tmp_path / "t5", tmp_path / "vae"  # the disk is full at prepare's first write, before encoders load
  for folder in (t5, vae):
    folder.mkdir()
    (folder / "config.json").write_text("{}")
  code = ("import errno, os, sys\nfrom ec_dit.prepare import state\n"  # the first file prepare writes
          "def full(out, fp):\n  raise OSError(errno.ENOSPC, 'No space left on device', os.path.join(out, state.STATE))\n"
          "state.record = full\nfrom absl import app\nfrom ec_dit.prepare import __main__ as m\n"
          f"sys.argv = ['prepare', '--config={REPO / 'tests' / 'latent_config.py'}', "
          f"'--source=folder:{images}', '--out={tmp_path / 'out'}', '--config.encoders.t5_path={t5}', "
          f"'--config.encoders.vae_path={vae}']\napp.run(m.main)\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last == f"error: no space left on device writing {tmp_path / 'out' / 'prepare_state.json'} (No space left on device)"
  assert "Traceback" not in out.stderr
  assert errors.is_disk_full(OSError(errno.ENOSPC, "x")) and not errors.is_disk_full(OSError(errno.EACCES, "x"))


# -- 9. sample file names: unique per prompt, the full prompt in a sidecar, truncation warned --------------------

def test_sample_names_are_unique_per_prompt_with_the_full_prompt_beside(tmp_path, monkeypatch, capsys):
  class Fake:
    @staticmethod
    def generate(ps, num_images_per_prompt, seed):
      return np.stack([np.full((4, 4, 3), 10 * k, np.uint8) for k in range(len(ps) * num_images_per_prompt)])

  monkeypatch.setattr(inference.TextToImagePipeline, "from_run", classmethod(lambda cls, *a, **k: Fake()))
  long = "a photo of " + "a very red square and " * 5 + "a circle"
  paths = inference.sample_to_files(str(tmp_path), ["A red square!", "a red square", long], num_images=2)
  assert len(set(paths)) == 6 and all(os.path.isfile(p) for p in paths)
  assert os.path.basename(paths[0]) == "000_a_red_square_0_0.png"
  assert os.path.basename(paths[2]) == "001_a_red_square_0_0.png"
  assert np.asarray(Image.open(paths[0]))[0, 0, 0] == 0 and np.asarray(Image.open(paths[2]))[0, 0, 0] == 20
  (sidecar_path,) = (tmp_path / "samples").glob("002_*.json")
  sidecar = json.loads(sidecar_path.read_text())
  assert sidecar["prompt"] == long and sidecar["images"] == [os.path.basename(p) for p in paths[4:]]
  assert "prompt 2 is longer than 60 characters" in capsys.readouterr().err
