"""GenEval's scoring rules, re-implemented without torch/mmdet.

This module reproduces the decision logic of GenEval's
``evaluation/evaluate_images.py`` (Ghosh et al., 2023):

* detections per class are filtered by confidence (``> 0.9`` for the
  ``counting`` task, ``> 0.3`` otherwise), sorted by confidence and capped at
  16 per class (:func:`select_detections`);
* ``include`` clauses are ANDed: each needs at least ``count`` kept
  detections of its class; a ``color`` is judged on the top-``count``
  detections only; a ``position`` ``[relation, group]`` compares every one of
  the top-``count`` detections with every object of the earlier include
  clause ``group`` (:func:`evaluate`);
* ``exclude`` clauses are ORed: the image fails if any excluded class has
  ``>= count`` kept detections (this is how "exactly N" is checked: include
  ``count=N`` and exclude ``count=N+1``);
* relative position uses box centres with a dead zone of
  ``0.1 * (dim_a + dim_b)`` per axis and a 0.5 cone, image y pointing down
  (:func:`relative_position`).

The ``reason`` strings use GenEval's wording so result files are
interchangeable with official ones.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import numpy as np

from ec_dit.vocabulary import COLORS, POSITION_THRESHOLD, RELATIONS, relative_position


THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16


@dataclasses.dataclass
class Detection:
  """One detected object.

  Attributes:
    box: ``(x1, y1, x2, y2)`` in pixels, image y pointing down.
    score: detector confidence in [0, 1].
    color: colour name if the detector already knows it (ShapesWorld does),
      else ``None`` and a colour classifier is asked.
    mask: optional boolean HxW mask of the object.
  """

  box: tuple[float, float, float, float]
  score: float = 1.0
  color: str | None = None
  mask: np.ndarray | None = None

  def as_list(self) -> list[float]:
    """``[x1, y1, x2, y2, score]`` as written to the ``details`` field."""
    return [float(v) for v in self.box] + [float(self.score)]


# A colour classifier maps (image, detections of one class, class name) to one
# colour name per detection.
ColorClassifier = Callable[[np.ndarray, Sequence[Detection], str], list]


def detection_colors(image, detections, classname):
  """Default colour classifier: use the colour the detector attached."""
  del image, classname
  out = []
  for d in detections:
    if d.color is None:
      raise ValueError("detection has no colour; pass a colour classifier")
    out.append(d.color)
  return out


def select_detections(detections: Mapping[str, Sequence[Detection]], tag: str,
                      threshold: float = THRESHOLD,
                      counting_threshold: float = COUNTING_THRESHOLD,
                      max_objects: int = MAX_OBJECTS) -> dict[str, list[Detection]]:
  """Keep the most confident detections per class, as GenEval does.

  Scores must be strictly above the threshold (``counting_threshold`` for the
  ``counting`` task). At most ``max_objects`` per class, most confident first
  (ties keep the input order). Classes with nothing left are dropped.
  """
  thr = counting_threshold if tag == "counting" else threshold
  kept = {}
  for cls, dets in detections.items():
    order = sorted(range(len(dets)), key=lambda i: -dets[i].score)
    sel = [dets[i] for i in order if dets[i].score > thr][:max_objects]
    if sel:
      kept[cls] = sel
  return kept


def _ordered(rels):
  return [r for r in RELATIONS if r in rels]


def evaluate(image, objects: Mapping[str, Sequence[Detection]], metadata: Mapping,
             color_classifier: ColorClassifier = detection_colors,
             margin: float = POSITION_THRESHOLD) -> tuple[bool, str]:
  """GenEval's ``evaluate``: judge one image from its kept detections.

  Args:
    image: HxWx3 uint8 image (only passed to the colour classifier).
    objects: class -> kept detections, most confident first (the output of
      :func:`select_detections`).
    metadata: a GenEval prompt (``include``, optional ``exclude``).
    color_classifier: see :data:`ColorClassifier`.
    margin: position dead-zone factor (GenEval: 0.1).

  Returns:
    ``(correct, reason)``; ``reason`` lists failed clauses, one per line.
  """
  correct = True
  reasons = []
  groups = []
  for req in metadata.get("include", []):
    cls, count = req["class"], int(req["count"])
    ok = True
    found = list(objects.get(cls, []))[:count]
    if len(found) < count:
      ok = False
      reasons.append(f"expected {cls}>={count}, found {len(found)}")
    else:
      if "color" in req:
        cols = list(color_classifier(image, found, cls))
        n_ok = cols.count(req["color"])
        if n_ok < count:
          ok = False
          tally = ", ".join(f"{cols.count(c)} {c}" for c in COLORS if c in cols)
          reasons.append(f"expected {req['color']} {cls}>={count}, found {n_ok} {req['color']}; and {tally}")
      if "position" in req and ok:
        rel, group = req["position"][0], int(req["position"][1])
        target = groups[group] if 0 <= group < len(groups) else None
        if target is None:
          ok = False
          reasons.append(f"no target for {cls} to be {rel}")
        else:
          for obj in found:
            for tgt in target:
              true_rels = relative_position(obj.box, tgt.box, margin)
              if rel not in true_rels:
                ok = False
                reasons.append(f"expected {cls} {rel} target, found {' and '.join(_ordered(true_rels))} target")
                break
            if not ok:
              break
    correct = correct and ok
    groups.append(found if ok else None)
  for req in metadata.get("exclude", []):
    cls, count = req["class"], int(req["count"])
    n = len(objects.get(cls, []))
    if n >= count:
      correct = False
      reasons.append(f"expected {cls}<{count}, found {n}")
  return correct, "\n".join(reasons)
