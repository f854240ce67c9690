"""The latent path end to end: prepare (killed and resumed), train from latents:DIR (resumed), sample."""

import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from ec_dit import schema, tasks
from ec_dit.data import latents, sources
from ec_dit.prepare import dataset, writer
from ec_dit.training import loop
from helpers import REPO, assert_resumes_bitwise, free_port, load_config, set_fields, xla_flags
from latent_fixtures import write_image_folder, write_t5, write_vae

CONFIG = REPO / "tests" / "latent_config.py"
OFFICIAL = REPO.parent / "shared" / "geneval" / "evaluation_metadata.jsonl"


def latent_config(**fields):
  config = load_config("latent_config", path=CONFIG)
  set_fields(config, fields)
  return config


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  root = tmp_path_factory.mktemp("latent")
  return {"t5": write_t5(root / "t5"), "vae": write_vae(root / "vae"), "images": write_image_folder(root / "images"),
          "root": root}


def _prepare_cmd(assets, out, *extra):
  return [sys.executable, "-m", "ec_dit.prepare", f"--config={CONFIG}", f"--source=folder:{assets['images']}",
          f"--out={out}", "--examples_per_shard=16", f"--config.encoders.t5_path={assets['t5']}",
          f"--config.encoders.vae_path={assets['vae']}", *extra]


def _files(folder):
  return {p.name: p.read_bytes() for p in sorted(pathlib.Path(folder).iterdir())}


@pytest.fixture(scope="module")
def prepared(assets):
  """The folder prepared in one uninterrupted run (in-process)."""
  out = assets["root"] / "prepared"
  config = latent_config(input__source=f"folder:{assets['images']}", encoders__t5_path=str(assets["t5"]),
                         encoders__vae_path=str(assets["vae"]))
  manifest = dataset.prepare_dataset(config, str(out), examples_per_shard=16)
  assert manifest is not None
  return out


def test_prepare_writes_shards_manifest_and_skips_bad_images(prepared, assets):
  manifest = latents.read_manifest(prepared)
  assert manifest["num_source_examples"] == 64 and manifest["num_examples"] == 62 and manifest["skipped"] == 2
  assert manifest["latent_shape"] == [8, 8, 4] and manifest["feature_dim"] == 32 and manifest["context_len"] == 16
  assert manifest["scaling_factor"] == pytest.approx(0.18215) and len(manifest["shards"]) == 4
  assert manifest["encoders"]["t5"]["config_sha256"] and manifest["encoders"]["vae"]["config_sha256"]
  skipped = [json.loads(line) for line in (prepared / "skipped.jsonl").read_text().splitlines()]
  assert [s["index"] for s in skipped] == [5, 17]
  assert all("005.png" in s["reason"] or "017.png" in s["reason"] for s in skipped), skipped
  source = latents.latents_source(prepared)
  headers = [latents.decode_record(source[i])[0] for i in range(len(source))]
  assert [h["index"] for h in headers] == [i for i in range(64) if i not in (5, 17)]
  empty = next(h for h in headers if h["index"] == 9)
  assert empty["caption"] == "" and empty["text_len"] == 1  # kept: EOS only, the unconditional prompt
  header, arrays = latents.decode_record(source[0])
  assert arrays["latent_mean"].shape == (8, 8, 4) and arrays["features"].shape == (header["text_len"], 32)
  assert float(np.min(arrays["latent_std"].astype(np.float32))) > 0


def test_prepare_killed_and_resumed_gives_identical_bytes(prepared, assets, tmp_path):
  out = tmp_path / "resumed"
  first = subprocess.run(_prepare_cmd(assets, out, "--max_shards=1"), capture_output=True, text=True, cwd=REPO,
                         timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  assert not (out / "manifest.json").exists() and len(list(out.glob("*.array_record"))) == 1
  proc = subprocess.Popen(_prepare_cmd(assets, out), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None and len(list(out.glob("*.array_record"))) < 2:
    time.sleep(0.05)
  proc.kill()  # mid-way (on a busy machine it may already be past its last shard): no chance to clean up
  proc.wait()
  last = subprocess.run(_prepare_cmd(assets, out), capture_output=True, text=True, cwd=REPO, timeout=600)
  assert last.returncode == 0, last.stderr[-3000:]
  assert not list(out.glob("*.tmp")), "a temporary file was left where a reader could find it"
  assert _files(out) == _files(prepared)  # byte for byte, manifest included


def test_train_from_latents_resumes_bitwise_then_samples(prepared, assets, tmp_path):
  config = latent_config(input__source=f"latents:{prepared}", encoders__t5_path=str(assets["t5"]),
                         encoders__vae_path=str(assets["vae"]))
  tasks.validate(config)
  run = tmp_path / "run"
  assert_resumes_bitwise(loop.train, config, run)
  out = subprocess.run([sys.executable, "-m", "ec_dit.main", f"--config={CONFIG}", f"--workdir={run}",
                        "--mode=sample", "--prompt=a photo of a red square", "--num_images=2"],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  paths = out.stdout.strip().splitlines()
  assert len(paths) == 2
  for p in paths:
    with Image.open(p) as im:
      assert im.size == (16, 16) and im.mode == "RGB"
  # --mode=evaluate: GenEval's official prompts in GenEval's layout, and the command that scores them
  out = subprocess.run([sys.executable, "-m", "ec_dit.main", f"--config={CONFIG}", f"--workdir={run}",
                        "--mode=evaluate", "--config.geneval.images_per_prompt=1", "--config.geneval.batch_size=128"],
                       capture_output=True, text=True, cwd=REPO, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  folders = sorted((run / "geneval" / "images").glob("[0-9]*"))
  assert len(folders) == 553 and (folders[0] / "samples" / "0000.png").exists()
  assert "evaluation/evaluate_images.py" in out.stdout and "python -m ec_dit.geneval summary" in out.stdout
  if OFFICIAL.exists():  # the prompts are GenEval's own file, line for line
    written = (run / "geneval" / "prompts.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in written] == [json.loads(x) for x in OFFICIAL.read_text().splitlines()]


def test_prepare_with_two_processes_gives_the_same_examples(prepared, assets, tmp_path):
  out, port = tmp_path / "two", free_port()
  # no compilation cache (tests/conftest.py sets one): both processes compile, so they reach collectives together
  env = dict(os.environ, XLA_FLAGS=xla_flags(2), JAX_PLATFORMS="cpu",
             JAX_ENABLE_COMPILATION_CACHE="false")
  procs = [subprocess.Popen(_prepare_cmd(assets, out, f"--coordinator_address=localhost:{port}",
                                         "--num_processes=2", f"--process_id={i}"),
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  results = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, results):
    assert p.returncode == 0, err[-3000:]
  # each process wrote its own shards (0, 2 and 1, 3); together they hold the one-process folder's examples.
  # (Not byte for byte: XLA's CPU code for 2 devices a process differs from 8 in the last float bits.)
  lines = [next(x for x in r[0].splitlines() if x.startswith('{"process"')) for r in results]  # Gloo logs too
  assert [json.loads(x)["shards_written"] for x in lines] == [2, 2]
  assert (out / "skipped.jsonl").read_bytes() == (prepared / "skipped.jsonl").read_bytes()
  one, two = latents.latents_source(prepared), latents.latents_source(out)
  assert len(one) == len(two) == 62
  for i in range(len(one)):
    (h1, a1), (h2, a2) = latents.decode_record(one[i]), latents.decode_record(two[i])
    assert h1 == h2
    for name in a1:
      np.testing.assert_allclose(a1[name].astype(np.float32), a2[name].astype(np.float32), rtol=2e-2, atol=2e-2)


def test_xl_without_paths_fails_fast_naming_the_fields(tmp_path):
  t0 = time.time()
  out = subprocess.run([sys.executable, "-m", "ec_dit.main", "--config=configs/ec_dit_xl.py",
                        f"--workdir={tmp_path / 'xl'}"], capture_output=True, text=True, cwd=REPO, timeout=120)
  assert out.returncode != 0
  for field in ("config.input.source", "config.encoders.t5_path", "config.encoders.vae_path"):
    assert field in out.stderr, out.stderr[-2000:]
  assert "Train EC-DiT on your own data" in out.stderr
  assert not (tmp_path / "xl").exists()
  assert time.time() - t0 < 60


def test_class_subfolders_give_labels(tmp_path):
  for name in ("dog", "cat"):
    write_image_folder(tmp_path / name, n=2, corrupt=(-1, -1), empty_caption=-1)
    for txt in (tmp_path / name).glob("*.txt"):
      txt.unlink()  # ImageNet style: no captions
  source = sources.make_source(schema.with_input_defaults({"source": f"folder:{tmp_path}"}))
  assert [source[i]["label"] for i in range(len(source))] == [0, 0, 1, 1]  # cat, cat, dog, dog (sorted)
  example = writer.read_example(source, 3, image_size=16, min_image_size=4)
  assert example.label == 1 and example.caption == "" and example.image.shape == (16, 16, 3)


@pytest.mark.parametrize("fields,match", [
    ({"input__image_size": 32}, r"config.model.input_size/in_channels: the VAE in .* turns config.input.image_size=32 "
                                r"images into 16x16x4 latents \(2x downsampling\), but the model takes 8x8x4; "
                                r"nothing was encoded. Set config.input.image_size=16"),
    ({"model__context_dim": 64}, r"config.model.context_dim: the T5 encoder in .* gives 32-wide features, but the "
                                 r"model's context_dim is 64; nothing was encoded"),
])
def test_prepare_checks_the_encoders_against_the_model_before_encoding(assets, tmp_path, fields, match):
  config = latent_config(input__source=f"folder:{assets['images']}", encoders__t5_path=str(assets["t5"]),
                         encoders__vae_path=str(assets["vae"]), **fields)
  with pytest.raises(ValueError, match=match):
    dataset.prepare_dataset(config, str(tmp_path / "out"), examples_per_shard=16)
  assert not (tmp_path / "out").exists()
