"""ShapesWorld: determinism, caption accuracy, grain and TFDS access."""
import importlib.util
import json

import numpy as np
import pytest

from ec_dit.data import shapes_world as sw
from ec_dit.geneval import harness, rules
from ec_dit.geneval.detectors import ShapesWorldDetector


def test_palette_and_background_golden():
  assert sw.PALETTE["orange"] == (245, 140, 30) and sw.PALETTE["pink"] == (245, 150, 190)
  assert sw.COLOR_NAMES == rules.COLORS
  img = sw.render([sw.Obj("square", "blue", 8, 8, 10)], 32)
  assert img.dtype == np.uint8 and img.shape == (32, 32, 3)
  assert tuple(img[0, 0]) == (128, 128, 128)
  assert tuple(img[12, 12]) == (40, 90, 220)  # fully covered pixel
  assert 0 < np.abs(img[8, 12].astype(int) - 128).sum()  # pixel edge: exact, aligned box


def test_caption_wording_golden():
  assert sw.with_article("orange") == "an orange" and sw.with_article("circle") == "a circle"
  assert sw.plural("triangle") == "triangles"
  rng = np.random.default_rng(0)
  assert sw._random_prompt("counting", rng)["prompt"] in {
      f"a photo of {n} {s}s" for n in ("two", "three", "four") for s in sw.SHAPES}


@pytest.mark.parametrize("size", [32, 64, 128])
def test_source_deterministic_random_access(size):
  a, b = sw.ShapesWorldSource(size, 10, seed=3), sw.ShapesWorldSource(size, 10, seed=3)
  for i in (7, 0, 9):
    x, y = a[i], b[i]
    assert x["image"].shape == (size, size, 3) and x["image"].dtype == np.uint8
    assert np.array_equal(x["image"], y["image"]) and x["caption"] == y["caption"]
    assert json.loads(x["metadata"])["prompt"] == x["caption"]
  assert np.array_equal(a[-1]["image"], a[9]["image"])
  assert not np.array_equal(a[0]["image"], sw.ShapesWorldSource(size, 10, seed=4)[0]["image"])
  with pytest.raises(IndexError):
    a[10]


def test_training_captions_are_accurate_and_mixed():
  """Every caption matches the image: the exact detector recovers its metadata."""
  src, det = sw.ShapesWorldSource(32, 280, seed=11), ShapesWorldDetector()
  tags = {}
  for i in range(len(src)):
    ex = src[i]
    meta = json.loads(ex["metadata"])
    tags[meta["tag"]] = tags.get(meta["tag"], 0) + 1
    found = det.detect(ex["image"])
    want = {}
    for c in meta["include"]:
      want[c["class"]] = want.get(c["class"], 0) + c["count"]
    assert {k: len(v) for k, v in found.items()} == want, ex["caption"]
    for c in meta["include"]:
      if "color" in c:
        n = sum(d.color == c["color"] for d in found[c["class"]])
        assert n >= c["count"], ex["caption"]
    if meta["tag"] != "descriptive":
      ok, reason, _ = harness.evaluate_image(ex["image"], meta, det)
      assert ok, (ex["caption"], reason)
  assert set(tags) == set(sw.CAPTION_TASKS) and min(tags.values()) >= 20


def test_descriptive_caption_locations():
  rng = np.random.default_rng(5)
  img, cap, meta = sw.sample_example(rng, 64, tasks=("descriptive",))
  assert meta["tag"] == "descriptive" and cap == meta["prompt"]
  assert any(w in cap for w in ("at the", "in the center"))
  assert sum(c["count"] for c in meta["include"]) == cap.count(" at the ") + cap.count(" in the center")


def test_render_from_metadata_checks():
  meta = {"tag": "counting", "include": [{"class": "square", "count": 3}],
          "exclude": [{"class": "square", "count": 4}], "prompt": "a photo of three squares"}
  a, b = sw.render_from_metadata(meta, 64, seed=1), sw.render_from_metadata(meta, 64, seed=1)
  assert np.array_equal(a, b) and a.shape == (64, 64, 3)
  assert len(ShapesWorldDetector().detect(a)["square"]) == 3
  with pytest.raises(ValueError, match="not a ShapesWorld shape"):
    sw.render_from_metadata({"include": [{"class": "dog", "count": 1}]})
  with pytest.raises(ValueError, match="contradict"):
    sw.render_from_metadata({"include": [{"class": "circle", "count": 2}], "exclude": [{"class": "circle", "count": 2}]})


def test_grain_map_dataset():
  ds = sw.make_dataset(32, 12, seed=2)
  src = sw.ShapesWorldSource(32, 12, seed=2)
  assert len(ds) == 12
  assert ds[5]["caption"] == src[5]["caption"]
  assert np.array_equal(ds[5]["image"], src[5]["image"])
  mapped = ds.map(lambda ex: ex["image"].mean())
  assert float(mapped[5]) == pytest.approx(float(src[5]["image"].mean()))


def test_tfds_data_source_offline(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  import ec_dit.data.shapes_world_tfds as swt  # registers the builder
  assert tfds.builder_cls("shapes_world") is swt.ShapesWorld
  ds = tfds.data_source("shapes_world/tiny", data_dir=str(tmp_path))
  assert len(ds["train"]) == 64 and len(ds["test"]) == 16
  ref = sw.ShapesWorldSource(32, 16, seed=swt.SPLIT_SEEDS["test"])
  for i in (0, 9):
    ex = ds["test"][i]
    assert ex["image"].dtype == np.uint8 and ex["image"].shape == (32, 32, 3)
    assert np.array_equal(ex["image"], ref[i]["image"])
    assert ex["caption"].decode() == ref[i]["caption"]
  if importlib.util.find_spec("tensorflow") is None:
    pytest.skip("tfds.load needs TensorFlow")
  loaded = tfds.load("shapes_world/tiny", split="test", data_dir=str(tmp_path))
  assert sum(1 for _ in loaded) == 16
