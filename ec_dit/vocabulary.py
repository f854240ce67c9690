"""The shared vocabulary of prompts, data and scoring: colours, shapes, numbers, relations, tasks.

ShapesWorld (`ec_dit.data`) writes captions in these words and GenEval's rules
(`ec_dit.geneval`) score them; both read the words, and the rule that decides
whether a relation holds, from here.
"""
from __future__ import annotations

import numpy as np

from ec_dit.schema import CAPTION_TASKS, TASKS

__all__ = ["CAPTION_TASKS", "COLORS", "NUMBERS", "POSITION_THRESHOLD", "RELATIONS", "SHAPES", "TASKS",
           "plural", "relative_position", "with_article"]

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")  # GenEval's ten
SHAPES = ("circle", "square", "triangle")  # ShapesWorld's classes
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
RELATIONS = ("left of", "right of", "above", "below")
POSITION_THRESHOLD = 0.1  # GenEval's dead zone, as a fraction of the two boxes' sizes


def with_article(word: str) -> str:
  """'a circle', 'an orange circle' (GenEval's rule: vowel first letter)."""
  return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def plural(word: str) -> str:
  """GenEval's plural rule: add 'es' after a final 's', else 's'."""
  return f"{word}es" if word.endswith("s") else f"{word}s"


def relative_position(box_a, box_b, margin: float = POSITION_THRESHOLD) -> set:
  """Relations of box A relative to box B ("left of", "right of", "above", "below").

  The centre offset is shrunk towards zero by ``margin * (dim_a + dim_b)`` per
  axis; if nothing is left the objects are "on top of each other" and the
  set is empty. A relation holds when the shrunk offset, divided by the
  length of the *unshrunk* offset, exceeds 0.5 along that axis.
  """
  a = np.asarray(box_a, dtype=np.float64)[:4]
  b = np.asarray(box_b, dtype=np.float64)[:4]
  ca = (a[:2] + a[2:]) / 2.0
  cb = (b[:2] + b[2:]) / 2.0
  dim_a = np.abs(a[2:] - a[:2])
  dim_b = np.abs(b[2:] - b[:2])
  offset = ca - cb
  shrunk = np.sign(offset) * np.maximum(np.abs(offset) - margin * (dim_a + dim_b), 0.0)
  if np.all(np.abs(shrunk) < 1e-3):
    return set()
  dx, dy = shrunk / np.linalg.norm(offset)
  rel = set()
  if dx < -0.5:
    rel.add("left of")
  if dx > 0.5:
    rel.add("right of")
  if dy < -0.5:
    rel.add("above")
  if dy > 0.5:
    rel.add("below")
  return rel
