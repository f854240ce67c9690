"""GenEval rule engine on hand-built detections (thresholds, top-k, margin, exclude)."""
import pytest

from ec_dit.geneval.rules import Detection, evaluate, relative_position, select_detections


def D(x, y, w=10, h=10, score=1.0, color=None):
  return Detection((x, y, x + w, y + h), score, color)


def judge(dets, meta):
  kept = select_detections(dets, meta["tag"])
  return evaluate(None, kept, meta)


COUNT2 = {"tag": "counting", "include": [{"class": "circle", "count": 2}],
          "exclude": [{"class": "circle", "count": 3}], "prompt": "a photo of two circles"}


def test_counting_exact_with_count_plus_one_exclude():
  assert judge({"circle": [D(0, 0), D(20, 0)]}, COUNT2) == (True, "")
  assert judge({"circle": [D(0, 0), D(20, 0), D(40, 0)]}, COUNT2) == (False, "expected circle<3, found 3")
  assert judge({"circle": [D(0, 0)]}, COUNT2) == (False, "expected circle>=2, found 1")
  assert judge({}, COUNT2) == (False, "expected circle>=2, found 0")


def test_thresholds_counting_vs_other_tasks():
  # 0.5 is kept by the 0.3 threshold but dropped by counting's 0.9.
  dets = {"circle": [D(0, 0), D(20, 0), D(40, 0, score=0.5)]}
  assert judge(dets, COUNT2)[0] is True
  single = {"tag": "single_object", "include": [{"class": "circle", "count": 1}],
            "exclude": [{"class": "circle", "count": 3}], "prompt": "x"}
  assert judge(dets, single) == (False, "expected circle<3, found 3")
  # Strictly greater than the threshold.
  assert select_detections({"circle": [D(0, 0, score=0.3)]}, "colors") == {}
  assert len(select_detections({"circle": [D(0, 0, score=0.9)]}, "counting")) == 0
  assert len(select_detections({"circle": [D(0, 0, score=0.31)]}, "colors")["circle"]) == 1


def test_top_k_by_confidence_and_cap_of_16():
  dets = {"square": [D(i, 0, score=0.4 + i / 100) for i in range(20)]}
  kept = select_detections(dets, "two_object")["square"]
  assert len(kept) == 16
  assert [d.score for d in kept] == sorted((d.score for d in kept), reverse=True)
  assert kept[0].box[0] == 19


def test_color_judged_on_most_confident_detections_only():
  meta = {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}], "prompt": "a photo of a red circle"}
  dets = {"circle": [D(0, 0, score=0.6, color="red"), D(20, 0, score=0.95, color="blue")]}
  assert judge(dets, meta) == (False, "expected red circle>=1, found 0 red; and 1 blue")
  dets["circle"][0].score = 0.99
  assert judge(dets, meta) == (True, "")


def test_relative_position_margin_dead_zone_and_cone():
  a = (0, 0, 10, 10)
  # Offset 1.9 < 0.1 * (10 + 10) = 2 on x and 0 on y: dead zone -> no relation.
  assert relative_position(a, (1.9, 0, 11.9, 10)) == set()
  # Outside the dead zone the shrunk offset must still exceed half the offset:
  # |d| - 2 > |d| / 2 needs |d| > 4.
  assert relative_position(a, (3.9, 0, 13.9, 10)) == set()
  assert relative_position(a, (4.5, 0, 14.5, 10)) == {"left of"}
  assert relative_position((4.5, 0, 14.5, 10), a) == {"right of"}
  # Image y points down: smaller y is "above".
  assert relative_position(a, (0, 30, 10, 40)) == {"above"}
  assert relative_position((0, 30, 10, 40), a) == {"below"}
  # Diagonal: both relations inside the 0.5 cone.
  assert relative_position(a, (30, 30, 40, 40)) == {"left of", "above"}
  # Mostly horizontal: dy/|offset| = (10 - 2) / sqrt(40^2 + 10^2) < 0.5.
  assert relative_position(a, (40, 10, 50, 20)) == {"left of"}


POS = {"tag": "position", "include": [{"class": "square", "count": 1},
                                      {"class": "circle", "count": 1, "position": ["left of", 0]}],
       "prompt": "a photo of a circle left of a square"}


def test_position_rule_and_reasons():
  assert judge({"square": [D(30, 0)], "circle": [D(0, 0)]}, POS) == (True, "")
  assert judge({"square": [D(0, 0)], "circle": [D(30, 0)]}, POS) == (
      False, "expected circle left of target, found right of target")
  # Inside the dead zone: an empty relation set.
  assert judge({"square": [D(0, 0)], "circle": [D(1, 1)]}, POS) == (
      False, "expected circle left of target, found  target")
  # Target group missing: both clauses fail.
  assert judge({"circle": [D(0, 0)]}, POS) == (
      False, "expected square>=1, found 0\nno target for circle to be left of")


def test_include_and_exclude_combination():
  meta = {"tag": "color_attr", "include": [{"class": "circle", "count": 1, "color": "red"},
                                           {"class": "square", "count": 1, "color": "blue"}],
          "exclude": [{"class": "triangle", "count": 1}], "prompt": "x"}
  ok = {"circle": [D(0, 0, color="red")], "square": [D(30, 0, color="blue")]}
  assert judge(ok, meta) == (True, "")
  swapped = {"circle": [D(0, 0, color="blue")], "square": [D(30, 0, color="red")]}
  ok2, reason = judge(swapped, meta)
  assert not ok2
  assert reason.splitlines() == ["expected red circle>=1, found 0 red; and 1 blue",
                                 "expected blue square>=1, found 0 blue; and 1 red"]
  extra = dict(ok, triangle=[D(50, 50, score=0.5)])
  assert judge(extra, meta) == (False, "expected triangle<1, found 1")


def test_detection_without_color_needs_classifier():
  meta = {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}], "prompt": "x"}
  with pytest.raises(ValueError, match="colour classifier"):
    judge({"circle": [D(0, 0)]}, meta)
  kept = select_detections({"circle": [D(0, 0)]}, "colors")
  assert evaluate(None, kept, meta, color_classifier=lambda im, d, c: ["red"] * len(d)) == (True, "")
