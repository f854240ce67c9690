"""GenEval prompt files: generation (ShapesWorld and COCO-80 domains) and validation.

A prompt file has one JSON object per line::

  {"tag": "position", "include": [{"class": "square", "count": 1},
   {"class": "circle", "count": 1, "position": ["left of", 0]}],
   "prompt": "a photo of a circle left of a square"}

:func:`generate_suite` follows GenEval's ``create_prompts.py`` step for
step (same random draws, same order, same de-duplication), so the COCO
domain with ``seed=43, per_task=100`` reproduces the official
``evaluation_metadata.jsonl`` (553 prompts).
"""
from __future__ import annotations

import json
from typing import Iterable, Sequence

import numpy as np

from ec_dit import errors
from ec_dit.vocabulary import COLORS, NUMBERS, RELATIONS, SHAPES, TASKS, plural, with_article

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush")
DOMAINS = {"shapes": SHAPES, "coco": COCO_CLASSES}


class PromptError(errors.EvaluationError):
  """A malformed prompt line; the message names the file, line and field."""


def _colorable(classes: Sequence[str], rng, size=None):
  """Class indices for colour prompts; GenEval never colours "person"."""
  n = len(classes)
  if "person" in classes:
    skip = classes.index("person")
    return (rng.choice(n - 1, size=size, replace=False) + 1 + skip) % n if size else \
        (rng.choice(n - 1) + 1 + skip) % n
  return rng.choice(n, size=size, replace=False) if size else rng.choice(n)


def generate_suite(classes: Sequence[str], seed: int = 43, per_task: int = 100) -> list[dict]:
  """GenEval prompt suite over ``classes``, de-duplicated, in GenEval's order.

  single_object covers ``min(per_task, len(classes))`` distinct classes; the
  other five tasks draw ``per_task`` prompts each (counting 2-4 with the
  count+1 exclude; position with the target first and ``[relation, 0]``).
  """
  classes = list(classes)
  if len(classes) < 2:
    raise ValueError("need at least two classes")
  rng = np.random.default_rng(seed)
  n = len(classes)
  out = []
  for i in rng.choice(n, size=min(per_task, n), replace=False):
    c = classes[i]
    out.append({"tag": "single_object", "include": [{"class": c, "count": 1}], "prompt": f"a photo of {with_article(c)}"})
  for _ in range(per_task):
    a, b = (classes[i] for i in rng.choice(n, size=2, replace=False))
    out.append({"tag": "two_object", "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
                "prompt": f"a photo of {with_article(a)} and {with_article(b)}"})
  for _ in range(per_task):
    c = classes[rng.choice(n)]
    k = int(rng.integers(2, 4, endpoint=True))
    out.append({"tag": "counting", "include": [{"class": c, "count": k}], "exclude": [{"class": c, "count": k + 1}],
                "prompt": f"a photo of {NUMBERS[k]} {plural(c)}"})
  for _ in range(per_task):
    c = classes[_colorable(classes, rng)]
    col = COLORS[rng.choice(len(COLORS))]
    out.append({"tag": "colors", "include": [{"class": c, "count": 1, "color": col}],
                "prompt": f"a photo of {with_article(col)} {c}"})
  for _ in range(per_task):
    a, b = (classes[i] for i in rng.choice(n, size=2, replace=False))
    rel = RELATIONS[rng.choice(len(RELATIONS))]
    out.append({"tag": "position", "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}],
                "prompt": f"a photo of {with_article(a)} {rel} {with_article(b)}"})
  for _ in range(per_task):
    a, b = (classes[i] for i in _colorable(classes, rng, size=2))
    ca, cb = (COLORS[i] for i in rng.choice(len(COLORS), size=2, replace=False))
    out.append({"tag": "color_attr",
                "include": [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
                "prompt": f"a photo of {with_article(ca)} {a} and {with_article(cb)} {b}"})
  seen, unique = set(), []
  for p in out:
    key = json.dumps(p, sort_keys=True)
    if key not in seen:
      seen.add(key)
      unique.append(p)
  return unique


def suite_from_config(geneval_config) -> list[dict]:
  """The prompt suite a run scores: ``config.geneval``'s domain, prompt seed and prompts per task."""
  g = geneval_config
  return generate_suite(DOMAINS[g.domain], g.prompt_seed, g.per_task)


def write_prompts(prompts: Iterable[dict], path: str) -> None:
  """Write prompts in the official format (one JSON object a line)."""
  with open(path, "w") as f:
    for p in prompts:
      f.write(json.dumps(p) + "\n")


def _check_int(v, where):
  if isinstance(v, bool) or not isinstance(v, int):
    raise PromptError(f"{where}: expected an integer, got {v!r}")
  return v


def validate_prompt(obj, where: str = "prompt") -> dict:
  """Check one prompt dict; raises :class:`PromptError` naming the bad field."""
  if not isinstance(obj, dict):
    raise PromptError(f"{where}: expected a JSON object, got {type(obj).__name__}")
  for key in ("tag", "include", "prompt"):
    if key not in obj:
      raise PromptError(f"{where}: missing field '{key}'")
  if obj["tag"] not in TASKS:
    raise PromptError(f"{where}: field 'tag' is {obj['tag']!r}, expected one of {list(TASKS)}")
  if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
    raise PromptError(f"{where}: field 'prompt' must be a non-empty string")
  inc = obj["include"]
  if not isinstance(inc, list) or not inc:
    raise PromptError(f"{where}: field 'include' must be a non-empty list")
  for field in ("include", "exclude"):
    clauses = obj.get(field, [])
    if not isinstance(clauses, list):
      raise PromptError(f"{where}: field '{field}' must be a list")
    for k, c in enumerate(clauses):
      w = f"{where}: field '{field}[{k}]"
      if not isinstance(c, dict):
        raise PromptError(f"{w}' must be an object")
      if not isinstance(c.get("class"), str) or not c["class"]:
        raise PromptError(f"{w}.class' must be a non-empty string")
      if "count" not in c:
        raise PromptError(f"{w}.count' is missing")
      if _check_int(c["count"], f"{w}.count'") < 1:
        raise PromptError(f"{w}.count' must be >= 1, got {c['count']}")
      if "color" in c and c["color"] not in COLORS:
        raise PromptError(f"{w}.color' is {c['color']!r}, expected one of {list(COLORS)}")
      if "position" in c:
        pos = c["position"]
        if field != "include" or not isinstance(pos, list) or len(pos) != 2:
          raise PromptError(f"{w}.position' must be [relation, group] in an include clause")
        if pos[0] not in RELATIONS:
          raise PromptError(f"{w}.position[0]' is {pos[0]!r}, expected one of {list(RELATIONS)}")
        g = _check_int(pos[1], f"{w}.position[1]'")
        if not 0 <= g < k:
          raise PromptError(f"{w}.position[1]' = {g} must name an earlier include clause (0..{k - 1})")
  return obj


def load_prompts(path: str) -> list[dict]:
  """Read and validate a prompt file; blank lines are skipped.

  Raises :class:`PromptError` as ``FILE:LINE: ...`` on the first bad line.
  """
  prompts = []
  with open(path) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise PromptError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
      prompts.append(validate_prompt(obj, where))
  if not prompts:
    raise PromptError(f"{path}: no prompts")
  return prompts


def count_tasks(prompts: Iterable[dict]) -> dict[str, int]:
  """Prompts per task, in GenEval's task order (all six tasks present)."""
  counts = {t: 0 for t in TASKS}
  for p in prompts:
    counts[p["tag"]] += 1
  return counts
