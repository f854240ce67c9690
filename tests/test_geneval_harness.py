"""Calibration of the harness on ShapesWorld: ground truth, noise, corruptions, robustness."""
import copy

import numpy as np
import pytest

from ec_dit.data import shapes_world as sw
from ec_dit.geneval import harness, prompts, scores
from ec_dit.geneval.detectors import ShapesWorldDetector, connected_components

DET = ShapesWorldDetector()
SUITE = prompts.generate_suite(prompts.DOMAINS["shapes"], seed=43, per_task=100)


def score(images_and_meta):
  rows = []
  for img, meta in images_and_meta:
    ok, reason, kept = harness.evaluate_image(img, meta, DET)
    rows.append(harness.result_row("x.png", meta, ok, reason, kept))
  return scores.summarize(rows)


@pytest.mark.parametrize("size,n,stride", [(32, 4, 1), (64, 2, 1), (128, 1, 2)])
def test_ground_truth_scores_at_least_099_per_task(size, n, stride):
  s = score((sw.render_from_metadata(p, size, [0, i, j]), p)
            for i, p in enumerate(SUITE) if i % stride == 0 or p["tag"] in ("single_object", "two_object")
            for j in range(n))
  for t in prompts.TASKS:
    assert s[t] >= 0.99, (size, t, s)


def test_noise_and_blank_images_score_near_zero():
  rng = np.random.default_rng(0)
  noise = score((rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), p) for p in SUITE for _ in range(2))
  blank = score((np.full((32, 32, 3), 128, np.uint8), p) for p in SUITE)
  assert noise["overall"] <= 0.05 and max(noise[t] for t in prompts.TASKS) <= 0.05, noise
  assert blank["overall"] == 0.0


def test_ground_truth_with_pixel_noise_still_scores():
  rng = np.random.default_rng(1)
  s = score((np.clip(sw.render_from_metadata(p, 32, [1, i]) + rng.normal(0, 8, (32, 32, 3)), 0, 255).astype(np.uint8), p)
            for i, p in enumerate(SUITE))
  assert s["overall"] >= 0.97, s


def first(tag):
  return next(p for p in SUITE if p["tag"] == tag)


def judge(render_meta, meta, seed=0):
  ok, reason, _ = harness.evaluate_image(sw.render_from_metadata(render_meta, 32, seed), meta, DET)
  return ok, reason


@pytest.mark.parametrize("delta", [-1, 1])
def test_corruption_count_off_by_one(delta):
  for meta in [p for p in SUITE if p["tag"] == "counting"][:4]:
    bad = copy.deepcopy(meta)
    bad["include"][0]["count"] += delta
    bad.pop("exclude")
    if bad["include"][0]["count"] < 1:
      continue
    cls, k = meta["include"][0]["class"], meta["include"][0]["count"]
    ok, reason = judge(bad, meta)
    assert not ok
    want = f"expected {cls}<{k + 1}, found {k + 1}" if delta > 0 else f"expected {cls}>={k}, found {k - 1}"
    assert reason == want


def test_corruption_swapped_colors():
  meta = first("color_attr")
  bad = copy.deepcopy(meta)
  a, b = bad["include"]
  a["color"], b["color"] = b["color"], a["color"]
  ok, reason = judge(bad, meta)
  assert not ok
  (ca, cls_a), (cb, cls_b) = [(c["color"], c["class"]) for c in meta["include"]]
  assert reason.splitlines() == [f"expected {ca} {cls_a}>=1, found 0 {ca}; and 1 {cb}",
                                 f"expected {cb} {cls_b}>=1, found 0 {cb}; and 1 {ca}"]


def test_corruption_flipped_relation():
  flip = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
  for meta in [p for p in SUITE if p["tag"] == "position"][:8]:
    bad = copy.deepcopy(meta)
    rel = meta["include"][1]["position"][0]
    bad["include"][1]["position"][0] = flip[rel]
    ok, reason = judge(bad, meta)
    assert not ok
    cls = meta["include"][1]["class"]
    assert reason.startswith(f"expected {cls} {rel} target, found ") and flip[rel] in reason


def test_corruption_missing_object():
  meta = first("two_object")
  bad = copy.deepcopy(meta)
  gone = bad["include"].pop(1)["class"]
  assert judge(bad, meta) == (False, f"expected {gone}>=1, found 0")


def test_detector_splits_touching_shapes_of_different_colors():
  objs = [sw.Obj("square", "red", 4, 8, 10), sw.Obj("square", "blue", 14, 8, 10),
          sw.Obj("circle", "yellow", 6, 18, 10), sw.Obj("triangle", "green", 16, 18.5, 11)]
  found = DET.detect(sw.render(objs, 32))
  assert sorted(d.color for d in found["square"]) == ["blue", "red"]
  assert [d.color for d in found["circle"]] == ["yellow"]
  assert [d.color for d in found["triangle"]] == ["green"]
  boxes = {d.color: d.box for v in found.values() for d in v}
  assert boxes["red"] == (4, 8, 14, 18) and boxes["blue"] == (14, 8, 24, 18)


def test_detector_tolerates_blur():
  from PIL import Image, ImageFilter
  rows = []
  for i, p in enumerate(SUITE[::2]):
    img = np.asarray(Image.fromarray(sw.render_from_metadata(p, 64, [2, i])).filter(ImageFilter.GaussianBlur(1.0)))
    rows.append(harness.evaluate_image(img, p, DET)[0])
  assert np.mean(rows) >= 0.95


def test_connected_components_matches_flood_fill():
  rng = np.random.default_rng(3)
  mask = rng.random((24, 24)) < 0.45
  lab, n = connected_components(mask, 4)
  # Reference: BFS flood fill.
  seen = np.zeros_like(mask)
  ref = 0
  for y, x in zip(*np.nonzero(mask)):
    if seen[y, x]:
      continue
    ref += 1
    stack = [(y, x)]
    seen[y, x] = True
    pix = []
    while stack:
      a, b = stack.pop()
      pix.append((a, b))
      for da, db in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        u, v = a + da, b + db
        if 0 <= u < 24 and 0 <= v < 24 and mask[u, v] and not seen[u, v]:
          seen[u, v] = True
          stack.append((u, v))
    assert len({lab[p] for p in pix}) == 1 and (lab == lab[y, x]).sum() == len(pix)
  assert n == ref and (lab[~mask] == 0).all()
