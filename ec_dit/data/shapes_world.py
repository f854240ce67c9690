"""ShapesWorld: an embedded, procedural text-to-image domain with exact detection.

Scenes are filled shapes (circle, square, point-up triangle) in GenEval's ten
colours on a mid-grey background, rendered anti-aliased with numpy (4x4
supersampling). Captions follow GenEval's prompt templates
(``single_object``, ``two_object``, ``counting``, ``colors``, ``position``,
``color_attr``) plus plain ``descriptive`` captions; every example comes with
the GenEval metadata dict describing it, and is a pure function of
``(seed, index)``.

Public API:

* :class:`ShapesWorldSource` -- grain ``RandomAccessDataSource`` of training
  examples ``{"image": uint8 HxWx3, "caption": str, "metadata": JSON str}``.
* :func:`make_dataset` -- the same wrapped in a ``grain.MapDataset``.
* :func:`render_from_metadata` -- a ground-truth image for a GenEval prompt.
* :func:`sample_example` -- one ``(image, caption, metadata)`` triple.
* :func:`render` / :class:`Obj` -- low-level scene rendering.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Mapping, Sequence

import numpy as np

from ec_dit.vocabulary import CAPTION_TASKS, NUMBERS, RELATIONS, SHAPES, plural, relative_position, with_article

PALETTE = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 40),
    "green": (50, 160, 60),
    "blue": (40, 90, 220),
    "purple": (130, 60, 180),
    "pink": (245, 150, 190),
    "brown": (120, 75, 35),
    "black": (25, 25, 25),
    "white": (240, 240, 240),
}
COLOR_NAMES = tuple(PALETTE)
BACKGROUND = (128, 128, 128)
SUPERSAMPLE = 4


@dataclasses.dataclass(frozen=True)
class Obj:
  """A shape in a scene: its axis-aligned bounding square ``(x, y, x+s, y+s)``."""

  shape: str
  color: str
  x: float
  y: float
  s: float

  @property
  def box(self) -> tuple[float, float, float, float]:
    return (self.x, self.y, self.x + self.s, self.y + self.s)


def _coverage(obj: Obj, size: int):
  """Fraction of each pixel covered by ``obj`` over its pixel bbox.

  Returns ``(y0, x0, alpha)`` with ``alpha`` a float array for rows
  ``y0:y0+h`` and columns ``x0:x0+w``.
  """
  ss = SUPERSAMPLE
  x0, y0 = max(int(np.floor(obj.x)), 0), max(int(np.floor(obj.y)), 0)
  x1, y1 = min(int(np.ceil(obj.x + obj.s)), size), min(int(np.ceil(obj.y + obj.s)), size)
  xs = x0 + (np.arange((x1 - x0) * ss) + 0.5) / ss
  ys = y0 + (np.arange((y1 - y0) * ss) + 0.5) / ss
  X, Y = np.meshgrid(xs, ys)
  cx, cy, r = obj.x + obj.s / 2, obj.y + obj.s / 2, obj.s / 2
  inside_box = (X >= obj.x) & (X <= obj.x + obj.s) & (Y >= obj.y) & (Y <= obj.y + obj.s)
  if obj.shape == "circle":
    m = (X - cx) ** 2 + (Y - cy) ** 2 <= r * r
  elif obj.shape == "square":
    m = inside_box
  elif obj.shape == "triangle":  # apex at top centre, base along the bottom edge
    m = inside_box & (np.abs(X - cx) <= (Y - obj.y) / 2)
  else:
    raise ValueError(f"unknown shape {obj.shape!r}; known: {SHAPES}")
  h, w = y1 - y0, x1 - x0
  alpha = m.reshape(h, ss, w, ss).mean(axis=(1, 3))
  return y0, x0, alpha


def render(objects: Sequence[Obj], size: int = 32, noise_std: float = 0.0,
           rng: np.random.Generator | None = None) -> np.ndarray:
  """Render shapes (anti-aliased) on the grey background; uint8 ``size x size x 3``.

  ``noise_std`` adds Gaussian pixel noise (needs ``rng``).
  """
  img = np.empty((size, size, 3), np.float64)
  img[:] = BACKGROUND
  for o in objects:
    y0, x0, a = _coverage(o, size)
    h, w = a.shape
    col = np.asarray(PALETTE[o.color], np.float64)
    region = img[y0:y0 + h, x0:x0 + w]
    region[:] = region * (1 - a[..., None]) + col * a[..., None]
  if noise_std > 0:
    img = img + rng.normal(0.0, noise_std, img.shape)
  return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------
# Layout


def _sizes(n: int, size: int, rng) -> list[float]:
  """Object sides: ~8-14 px at 32 px for one or two objects, 8-11 px for more."""
  hi = 0.44 if n <= 2 else 0.34
  return [float(rng.uniform(0.25, hi) * size) for _ in range(n)]


def _gap(a: Obj, b: Obj) -> float:
  """Gap between two bounding squares (negative when they overlap)."""
  dx = max(b.x - (a.x + a.s), a.x - (b.x + b.s))
  dy = max(b.y - (a.y + a.s), a.y - (b.y + b.s))
  return max(dx, dy)


def place(specs: Sequence[tuple[str, str]], size: int, rng: np.random.Generator,
          relation: tuple[int, str, int] | None = None, min_gap: float | None = None,
          max_tries: int = 2000) -> list[Obj]:
  """Place ``(shape, colour)`` specs on the canvas without overlaps.

  Args:
    specs: shapes to place.
    size: canvas side.
    rng: random generator.
    relation: optional ``(a, relation, b)``: spec ``a`` must be ``relation``
      (GenEval wording) of spec ``b``; it is enforced with twice GenEval's
      margin so the rule still holds after rasterisation.
    min_gap: minimum gap between bounding squares (default ``size / 32``).
      Positions and sides are rounded to whole pixels.
    max_tries: rejection-sampling budget before objects are shrunk.
  """
  n = len(specs)
  gap = size / 32 if min_gap is None else min_gap
  edge = size / 32
  sides = _sizes(n, size, rng)
  for attempt in range(20):
    for _ in range(max_tries // 20):
      objs = []
      for (shape, color), s in zip(specs, sides):
        # Whole-pixel boxes keep square corners crisp at every size.
        s = float(max(round(s), 4))
        x = float(round(rng.uniform(edge, size - edge - s)))
        y = float(round(rng.uniform(edge, size - edge - s)))
        objs.append(Obj(shape, color, x, y, s))
      if any(_gap(objs[i], objs[j]) < gap for i in range(n) for j in range(i)):
        continue
      if relation is not None:
        a, rel, b = relation
        if rel not in relative_position(objs[a].box, objs[b].box, margin=0.2):
          continue
      return objs
    sides = [s * 0.93 for s in sides]
  raise RuntimeError(f"could not place {n} objects on a {size}px canvas")


# ----------------------------------------------------------------------------
# Scenes from GenEval metadata


def scene_from_metadata(metadata: Mapping, size: int, rng: np.random.Generator) -> list[Obj]:
  """Objects realising a GenEval prompt: exactly ``count`` of each include clause.

  Unspecified colours are random. ``position`` clauses need single objects in
  both groups (as in GenEval). Raises ``ValueError`` for classes outside
  ShapesWorld or for contradictory include/exclude clauses.
  """
  specs, groups, relation = [], [], None
  for k, req in enumerate(metadata.get("include", [])):
    cls = req["class"]
    if cls not in SHAPES:
      raise ValueError(f"class {cls!r} is not a ShapesWorld shape {SHAPES}")
    color = req.get("color")
    if color is not None and color not in PALETTE:
      raise ValueError(f"colour {color!r} is not one of {COLOR_NAMES}")
    start = len(specs)
    for _ in range(int(req["count"])):
      specs.append((cls, color or COLOR_NAMES[rng.integers(len(COLOR_NAMES))]))
    groups.append(list(range(start, len(specs))))
    if "position" in req:
      rel, g = req["position"][0], int(req["position"][1])
      if rel not in RELATIONS or not 0 <= g < k:
        raise ValueError(f"bad position {req['position']!r} in include[{k}]")
      if len(groups[-1]) != 1 or len(groups[g]) != 1 or relation is not None:
        raise ValueError("ShapesWorld renders one position clause between single objects")
      relation = (groups[-1][0], rel, groups[g][0])
  for req in metadata.get("exclude", []):
    have = sum(1 for s, _ in specs if s == req["class"])
    if have >= int(req["count"]):
      raise ValueError(f"include clauses contradict exclude {req}")
  if len(specs) > 6:
    raise ValueError(f"too many objects ({len(specs)}) for ShapesWorld")
  return place(specs, size, rng, relation)


def render_from_metadata(metadata: Mapping, size: int = 32, seed: int = 0,
                         noise_std: float = 0.0) -> np.ndarray:
  """Ground-truth ShapesWorld image (uint8 HxWx3) for a GenEval prompt dict."""
  rng = np.random.default_rng(seed)
  return render(scene_from_metadata(metadata, size, rng), size, noise_std, rng)


# ----------------------------------------------------------------------------
# Training captions


def _location(o: Obj, size: int) -> str:
  cx, cy = (o.x + o.s / 2) / size, (o.y + o.s / 2) / size
  row = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else ""
  col = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else ""
  where = " ".join(p for p in (row, col) if p)
  return f"at the {where}" if where else "in the center"


def _join(parts: Sequence[str]) -> str:
  return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _random_prompt(task: str, rng: np.random.Generator) -> dict:
  """A GenEval-style prompt over the ShapesWorld vocabulary (one task)."""
  shape = lambda: SHAPES[rng.integers(len(SHAPES))]
  color = lambda: COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
  if task == "single_object":
    s = shape()
    return dict(tag=task, include=[{"class": s, "count": 1}], prompt=f"a photo of {with_article(s)}")
  if task == "two_object":
    a, b = (SHAPES[i] for i in rng.choice(len(SHAPES), 2, replace=False))
    return dict(tag=task, include=[{"class": a, "count": 1}, {"class": b, "count": 1}],
                prompt=f"a photo of {with_article(a)} and {with_article(b)}")
  if task == "counting":
    s, n = shape(), int(rng.integers(2, 5))
    return dict(tag=task, include=[{"class": s, "count": n}], exclude=[{"class": s, "count": n + 1}],
                prompt=f"a photo of {NUMBERS[n]} {plural(s)}")
  if task == "colors":
    s, c = shape(), color()
    return dict(tag=task, include=[{"class": s, "count": 1, "color": c}],
                prompt=f"a photo of {with_article(c)} {s}")
  if task == "position":
    a, b = (SHAPES[i] for i in rng.choice(len(SHAPES), 2, replace=False))
    rel = RELATIONS[rng.integers(len(RELATIONS))]
    return dict(tag=task, include=[{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}],
                prompt=f"a photo of {with_article(a)} {rel} {with_article(b)}")
  if task == "color_attr":
    a, b = (SHAPES[i] for i in rng.choice(len(SHAPES), 2, replace=False))
    ca, cb = (COLOR_NAMES[i] for i in rng.choice(len(COLOR_NAMES), 2, replace=False))
    return dict(tag=task, include=[{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
                prompt=f"a photo of {with_article(ca)} {a} and {with_article(cb)} {b}")
  raise ValueError(f"unknown task {task!r}")


def sample_example(rng: np.random.Generator, size: int = 32,
                   tasks: Sequence[str] = CAPTION_TASKS, noise_std: float = 0.0):
  """One training example ``(image, caption, metadata)`` with an accurate caption.

  The task is drawn uniformly from ``tasks``. GenEval tasks yield GenEval
  metadata; ``descriptive`` captions list each object's colour, shape and
  coarse location (metadata tag ``"descriptive"``, include clauses with
  colour counts).
  """
  task = tasks[rng.integers(len(tasks))]
  if task != "descriptive":
    meta = _random_prompt(task, rng)
    objs = scene_from_metadata(meta, size, rng)
    return render(objs, size, noise_std, rng), meta["prompt"], meta
  n = int(rng.integers(1, 5))
  specs = [(SHAPES[rng.integers(len(SHAPES))], COLOR_NAMES[rng.integers(len(COLOR_NAMES))]) for _ in range(n)]
  objs = place(specs, size, rng)
  caption = _join([f"{with_article(o.color)} {o.shape} {_location(o, size)}" for o in objs])
  counts: dict = {}
  for o in objs:
    counts[(o.shape, o.color)] = counts.get((o.shape, o.color), 0) + 1
  meta = dict(tag="descriptive", include=[{"class": s, "count": c, "color": col} for (s, col), c in counts.items()],
              prompt=caption)
  return render(objs, size, noise_std, rng), caption, meta


class ShapesWorldSource:
  """grain ``RandomAccessDataSource`` of ShapesWorld training examples.

  ``source[i]`` is ``{"image": uint8 (size, size, 3), "caption": str,
  "metadata": JSON str}``, a pure function of ``(seed, i)`` (random access,
  no state, safe across worker processes).

  Args:
    size: canvas side in pixels (32, 64, 128, ...).
    num_examples: length of the source.
    seed: base seed.
    tasks: caption tasks to mix uniformly (default: the six GenEval tasks and
      ``descriptive``).
    noise_std: optional Gaussian pixel noise.
  """

  def __init__(self, size: int = 32, num_examples: int = 100_000, seed: int = 0,
               tasks: Sequence[str] = CAPTION_TASKS, noise_std: float = 0.0):
    for t in tasks:
      if t not in CAPTION_TASKS:
        raise ValueError(f"unknown task {t!r}; known: {CAPTION_TASKS}")
    self.size, self.num_examples, self.seed = int(size), int(num_examples), int(seed)
    self.tasks, self.noise_std = tuple(tasks), float(noise_std)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if index < 0:
      index += self.num_examples
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} out of range for {self.num_examples} examples")
    rng = np.random.default_rng([self.seed, index])
    image, caption, meta = sample_example(rng, self.size, self.tasks, self.noise_std)
    return {"image": image, "caption": caption, "metadata": json.dumps(meta)}

  def __repr__(self) -> str:
    return (f"ShapesWorldSource(size={self.size}, num_examples={self.num_examples}, "
            f"seed={self.seed}, tasks={self.tasks})")


def make_dataset(size: int = 32, num_examples: int = 100_000, seed: int = 0, **kwargs):
  """``grain.MapDataset`` over :class:`ShapesWorldSource` (imports grain lazily)."""
  import grain
  return grain.MapDataset.source(ShapesWorldSource(size, num_examples, seed, **kwargs))
