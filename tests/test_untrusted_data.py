"""Issue 27 items 3, 6, 7 and the caption part of 8: prepare cannot mix or drop data, latent shards are checked up
front, image decoding is bounded and reads float / 16-bit images by their range."""

import hashlib
import json
import pathlib
import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ec_dit import errors, schema
from ec_dit.data import latents, preprocess, sources
from ec_dit.prepare import dataset, state, writer
from ec_dit.workdir_lock import Lock, WorkdirError
from helpers import REPO, load_config, set_fields
from latent_fixtures import FIXTURES, write_image_folder, write_t5

CONFIG = REPO / "tests" / "latent_config.py"


def _config(assets, **fields):
  config = load_config("latent_config", path=CONFIG)
  set_fields(config, {"input__source": f"folder:{assets['images']}", "encoders__t5_path": str(assets["t5"]),
                      "encoders__vae_path": str(assets["vae"]), **fields})
  return config


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  root = tmp_path_factory.mktemp("untrusted")
  vae = pathlib.Path(shutil.copytree(FIXTURES / "vae4", root / "vae"))  # the committed VAE: 16x16 -> 8x8x4
  vae_b = pathlib.Path(shutil.copytree(vae, root / "vae_b"))  # another checkpoint: the same config, other weights
  weights = vae_b / "diffusion_pytorch_model.safetensors"
  data = bytearray(weights.read_bytes())
  data[-64:] = bytes(64)  # the last weights' values
  weights.write_bytes(bytes(data))
  return {"t5": write_t5(root / "t5"), "vae": vae, "vae_b": vae_b, "images": write_image_folder(root / "images", n=24),
          "root": root}


@pytest.fixture(scope="module")
def prepared(assets):
  out = assets["root"] / "prepared"
  assert dataset.prepare_dataset(_config(assets), str(out), examples_per_shard=8) is not None
  return out


def _hashes(folder):
  return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(pathlib.Path(folder).iterdir())}


# -- 3. prepare: a resume that differs stops before writing; one job per folder -----------------------------------

def test_a_resume_with_other_encoders_or_examples_per_shard_stops_before_writing(assets, prepared, tmp_path):
  out = tmp_path / "partial"
  assert dataset.prepare_dataset(_config(assets), str(out), examples_per_shard=8, max_shards=1) is None
  before = _hashes(out)
  assert len([n for n in before if n.endswith(".array_record")]) == 1 and state.STATE in before
  recorded = json.loads((out / state.STATE).read_text())
  assert recorded["examples_per_shard"] == 8 and recorded["encoders"]["vae"]["diffusion_pytorch_model.safetensors"]
  with pytest.raises(errors.PrepareError, match=r"Nothing was written.*encoders\.vae\.diffusion_pytorch_model\."
                                                r"safetensors: '[0-9a-f]+' -> '[0-9a-f]+'"):
    dataset.prepare_dataset(_config(assets, encoders__vae_path=str(assets["vae_b"])), str(out), examples_per_shard=8)
  assert _hashes(out) == before
  with pytest.raises(errors.PrepareError, match=r"examples_per_shard: 8 -> 9"):
    dataset.prepare_dataset(_config(assets), str(out), examples_per_shard=9)
  assert _hashes(out) == before
  (assets["images"] / "000.txt").write_text("a photo of a blue square")  # the source listing changed
  try:
    with pytest.raises(errors.PrepareError, match=r"source\.listing_sha256"):
      dataset.prepare_dataset(_config(assets), str(out), examples_per_shard=8)
  finally:
    (assets["images"] / "000.txt").write_text("a photo of a red square")
  assert _hashes(out) == before
  # the same settings resume and finish, with the fingerprint in the manifest
  manifest = dataset.prepare_dataset(_config(assets), str(out), examples_per_shard=8)
  assert manifest["fingerprint"] == recorded and _hashes(out) == _hashes(prepared)


def test_prepare_takes_the_workdir_lock(assets, tmp_path):
  out = tmp_path / "locked"
  out.mkdir()
  held = Lock(str(out))  # another job holds the folder
  try:
    with pytest.raises(WorkdirError, match="in use by another run"):
      dataset.prepare_dataset(_config(assets), str(out), examples_per_shard=8)
  finally:
    held.release()
  assert sorted(p.name for p in out.iterdir()) == []


def test_shards_without_a_fingerprint_are_not_resumed(assets, tmp_path):
  out = tmp_path / "old"
  out.mkdir()
  (out / latents.shard_name(0, 3)).write_bytes(b"x")
  with pytest.raises(errors.PrepareError, match="no prepare_state.json"):
    dataset.prepare_dataset(_config(assets), str(out), examples_per_shard=8)


# -- 6. latents: shards checked at start, each error naming the file ----------------------------------------------

def _copy(prepared, tmp_path):
  out = tmp_path / "copy"
  out.mkdir()
  for p in prepared.iterdir():
    (out / p.name).write_bytes(p.read_bytes())
  return out, json.loads((out / latents.MANIFEST).read_text())


def test_a_truncated_shard_is_named_at_start(prepared, tmp_path):
  out, manifest = _copy(prepared, tmp_path)
  shard = out / manifest["shards"][1]
  shard.write_bytes(shard.read_bytes()[:-5])
  c = schema.with_input_defaults(schema.base_config().input)
  c.source = f"latents:{out}"
  with pytest.raises(errors.DataError, match=rf"{shard}: damaged shard"):
    sources.check_source(c)


def test_a_flipped_byte_names_the_shard_and_record(prepared, tmp_path):
  out, manifest = _copy(prepared, tmp_path)
  shard = out / manifest["shards"][2]
  data = bytearray(shard.read_bytes())
  data[len(data) // 2] ^= 0xFF  # inside a later record's chunk: the start check reads only the first record
  shard.write_bytes(bytes(data))
  try:
    source = latents.latents_source(out)
  except errors.DataError as e:  # caught at start (the flip hit the header or the first record)
    assert str(shard) in str(e)
    return
  with pytest.raises(errors.DataError, match=rf"{shard}: record \d+ \(example \d+\)"):
    for i in range(len(source)):
      source[i]


def test_a_shard_of_another_shape_and_a_manifest_that_does_not_fit_the_model_are_named(prepared, tmp_path):
  out, manifest = _copy(prepared, tmp_path)
  shard = out / manifest["shards"][0]
  other = latents.encode_record({"latent_mean": np.zeros((4, 4, 4), latents.BF16),
                                 "latent_std": np.ones((4, 4, 4), latents.BF16),
                                 "features": np.zeros((3, 32), latents.BF16)}, caption="x", label=-1, index=0,
                                text_len=3, truncated=False)
  writer.write_shard(out, shard.name, [other] * 8, {"count": 8})
  with pytest.raises(errors.DataError, match=rf"{shard}: record 0 has latent_mean of shape \(4, 4, 4\); "
                                             r"manifest.json says latent_shape \[8, 8, 4\]"):
    latents.check_shards(out, manifest)
  model = load_config("latent_config", path=CONFIG).model
  model.input_size = 16
  with pytest.raises(errors.DataError, match=r"config.model.input_size: the prepared data \(.*manifest.json\) has 8"):
    latents.check_compatible(manifest, model, where=str(out / latents.MANIFEST))
  with pytest.raises(errors.DataError, match="latent_shape must be"):
    latents.check_compatible(dict(manifest, latent_shape=[8, 8]), model)


# -- 7. image decode: a pixel limit before decoding; float and 16-bit images by their range -----------------------

def _png_claiming(path, width, height):
  """A 1x1 PNG whose header claims width x height (what a decompression bomb's header looks like)."""
  Image.new("L", (1, 1)).save(path)
  data = bytearray(path.read_bytes())
  ihdr = data[12:29]  # type + 13 bytes of IHDR data
  ihdr[4:12] = struct.pack(">II", width, height)
  data[12:29], data[29:33] = ihdr, struct.pack(">I", zlib.crc32(bytes(ihdr)))
  path.write_bytes(bytes(data))
  return path


def test_images_over_the_pixel_limit_are_skipped_before_decoding(tmp_path):
  bomb = _png_claiming(tmp_path / "bomb.png", 13000, 13000)
  source = [{"image": str(bomb), "caption": "x"}]
  ex = writer.read_example(source, 0, image_size=16, min_image_size=4)
  assert ex.image is None and ex.skipped == (f"image {bomb} is 13000x13000 = 169000000 pixels, over "
                                             f"--max_image_pixels={writer.MAX_IMAGE_PIXELS}")
  Image.new("RGB", (100, 100)).save(tmp_path / "small.png")
  source = [{"image": str(tmp_path / "small.png"), "caption": "x"}]
  assert "over --max_image_pixels=5000" in writer.read_example(source, 0, image_size=16, min_image_size=4,
                                                               max_image_pixels=5000).skipped
  assert writer.read_example(source, 0, image_size=16, min_image_size=4).image.shape == (16, 16, 3)


def test_float_and_16_bit_images_are_read_by_their_range_or_skipped(tmp_path):
  ramp = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
  Image.fromarray(ramp, mode="F").save(tmp_path / "f.tif")
  Image.fromarray((ramp * 65535).astype(np.uint16)).save(tmp_path / "g16.png")
  for name in ("f.tif", "g16.png"):
    img = preprocess.load_image(str(tmp_path / name), 32)
    assert abs(float(img.mean()) - 127.5) < 3 and img.max() >= 250, (name, img.mean())  # not black, full range
  Image.fromarray(ramp * 1e6, mode="F").save(tmp_path / "huge.tif")
  ex = writer.read_example([{"image": str(tmp_path / "huge.tif"), "caption": "x"}], 0, image_size=16,
                           min_image_size=4)
  assert ex.image is None and "outside the known ranges" in ex.skipped and "huge.tif" in ex.skipped


# -- 8. a caption that is not UTF-8 in class subfolders: skipped with its reason, or a named error -----------------

def test_a_non_utf8_caption_in_class_subfolders_is_skipped_or_named(tmp_path):
  for k, cls in enumerate(("cats", "dogs")):
    (tmp_path / cls).mkdir()
    Image.new("RGB", (16, 16), (k * 100, 0, 0)).save(tmp_path / cls / "a.png")
  (tmp_path / "dogs" / "a.txt").write_bytes(b"caf\xe9")
  c = schema.with_input_defaults(schema.base_config().input)
  c.source = f"folder:{tmp_path}"
  with pytest.raises(errors.DataError, match=rf"caption file {tmp_path / 'dogs' / 'a.txt'} is not UTF-8"):
    sources.make_source(c)
  c.skip_bad_examples = True
  source = sources.make_source(c)
  ex = writer.read_example(source, 1, image_size=16, min_image_size=4)
  assert ex.image is None and ex.skipped.startswith(f"caption file {tmp_path / 'dogs' / 'a.txt'} is not UTF-8")
