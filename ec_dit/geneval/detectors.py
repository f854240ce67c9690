"""Object detectors for the harness.

A detector is any object with ``detect(image) -> {class: [Detection, ...]}``
(image uint8 HxWx3; detections most confident first). Detections may carry a
colour; otherwise the harness needs a colour classifier (see
:mod:`ec_dit.geneval.rules`).

Built in: :class:`ShapesWorldDetector`, exact on ShapesWorld renders and
tolerant of blur, anti-aliasing, colour noise and touching shapes of
different colours. Adapters for real photographs (mmdet Mask2Former +
open_clip, as in GenEval) are not bundled; :func:`get_detector` names what
would be needed.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from ec_dit.data.shapes_world import BACKGROUND, PALETTE
from ec_dit.geneval.rules import Detection


class Detector(Protocol):
  """Detector interface used by :func:`ec_dit.geneval.harness.evaluate_images`."""

  def detect(self, image: np.ndarray) -> dict[str, list[Detection]]:
    ...


_NAMES = list(PALETTE)
_COLS = np.asarray([PALETTE[c] for c in _NAMES], np.float64)
_BG = np.asarray(BACKGROUND, np.float64)


def classify_pixels(image: np.ndarray):
  """Per-pixel colour index and strength by unmixing from the background.

  A pixel ``p`` is modelled as ``bg + a * (c_k - bg)`` (an anti-aliased or
  faded colour ``k``). For every palette colour, ``a`` is the projection
  onto the segment bg->c_k clipped to [0, 1]; the colour is the segment
  nearest to ``p``. Returns ``(label int HxW, alpha float HxW, strength
  float HxW)`` where ``strength = alpha * |c_k - bg|`` is the distance from
  the background along that colour.
  """
  p = image.astype(np.float64)[..., None, :] - _BG  # H,W,1,3
  d = _COLS - _BG  # K,3
  a = np.clip((p * d).sum(-1) / (d * d).sum(-1), 0.0, 1.0)  # H,W,K
  resid = ((p - a[..., None] * d) ** 2).sum(-1)
  label = resid.argmin(-1)
  alpha = np.take_along_axis(a, label[..., None], -1)[..., 0]
  strength = alpha * np.linalg.norm(d, axis=-1)[label]
  return label, alpha, strength


def connected_components(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
  """Label connected components of a boolean mask (numpy, no scipy).

  Returns ``(labels, n)`` with labels ``1..n`` (0 = background), numbered in
  raster order of each component's first pixel.
  """
  h, w = mask.shape
  if not mask.any():
    return np.zeros((h, w), np.int64), 0
  big = h * w
  idx = np.arange(big, dtype=np.int64).reshape(h, w)
  lab = np.where(mask, idx, big)
  if connectivity == 8:
    shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
  else:
    shifts = [(-1, 0), (1, 0), (0, -1), (0, 1)]
  flat_mask = mask.ravel()
  while True:
    pad = np.pad(lab, 1, constant_values=big)
    new = lab.copy()
    for dy, dx in shifts:
      np.minimum(new, pad[1 + dy:1 + dy + h, 1 + dx:1 + dx + w], out=new)
    new = np.where(mask, new, big)
    # Pointer jumping: follow label -> label of that pixel until stable.
    flat = new.ravel()
    for _ in range(4):
      tgt = np.where(flat_mask, flat[np.minimum(flat, big - 1)], big)
      flat = np.minimum(flat, tgt)
    new = flat.reshape(h, w)
    if np.array_equal(new, lab):
      break
    lab = new
  roots = np.unique(lab[mask])
  out = np.zeros(big + 1, np.int64)
  out[roots] = np.arange(1, len(roots) + 1)
  return out[lab], len(roots)


def classify_shape(mask: np.ndarray, soft: np.ndarray | None = None) -> str | None:
  """Circle / square / triangle from a tight object mask, or ``None``.

  Features, in bbox-normalised coordinates ``u, v`` in [-1, 1]:
  the top-to-bottom mass ratio (point-up triangle ~1/3, others ~1), the
  filled fraction of the bbox corners ``|u| + |v| > 1.55`` (square ~1,
  circle ~0) and the fill ratio of the bbox (square ~1.0, circle ~0.785,
  triangle ~0.5). Returns ``None`` for blobs that fit no shape (elongated,
  sparse, upside-down). ``soft`` (optional, HxW in [0, 1]) is the object's
  partial coverage outside the mask; corner pixels count with it so squares
  whose anti-aliased corners fall just below the mask threshold stay squares.
  """
  ys, xs = np.nonzero(mask)
  y0, x0 = ys.min(), xs.min()
  h, w = ys.max() - y0 + 1, xs.max() - x0 + 1
  if max(h, w) > 2.0 * min(h, w):
    return None
  fill = len(ys) / float(h * w)
  mid = y0 + h / 2.0 - 0.5
  top = np.sum(ys < mid) + 0.5 * np.sum(ys == mid)
  tb = top / max(len(ys) - top, 1e-6)
  if fill < 0.35 or tb > 1.6:
    return None
  if tb < 0.65:
    return "triangle"
  if fill < 0.6:
    return None
  gy, gx = np.mgrid[0:h, 0:w]
  u = (gx + 0.5 - w / 2.0) / (w / 2.0)
  v = (gy + 0.5 - h / 2.0) / (h / 2.0)
  corner = np.abs(u) + np.abs(v) > 1.55
  cov = mask[y0:y0 + h, x0:x0 + w].astype(np.float64)
  if soft is not None:
    cov = np.maximum(cov, soft[y0:y0 + h, x0:x0 + w])
  corner_fill = cov[corner].mean() if corner.any() else 0.0
  return "square" if corner_fill >= 0.5 else "circle"


class ShapesWorldDetector:
  """Exact detector for ShapesWorld scenes (confidence 1.0, colour attached).

  Steps: unmix every pixel against the grey background
  (:func:`classify_pixels`); foreground = at least ``min_alpha`` of a colour
  and ``min_strength`` away from grey; 8-connected components of the
  foreground; components whose substantial colours (each at least
  ``split_frac`` of it) cover less than ``purity`` of it are dropped as
  noise; a component with two or more substantial colours (touching
  shapes) is split into 4-connected components per colour; components
  smaller than ``min_area_frac`` of the canvas or of no recognisable shape
  are dropped; colour = majority pixel colour; box = ``(x1, y1, x2+1, y2+1)``
  of the pixels. Per class, larger objects come first.
  """

  def __init__(self, min_alpha: float = 0.5, min_strength: float = 30.0,
               min_area_frac: float = 0.01, split_frac: float = 0.2, purity: float = 0.6):
    self.min_alpha, self.min_strength, self.purity = min_alpha, min_strength, purity
    self.min_area_frac, self.split_frac = min_area_frac, split_frac

  def _objects(self, label, fg, min_area):
    comps, n = connected_components(fg, 8)
    for k in range(1, n + 1):
      comp = comps == k
      area = int(comp.sum())
      if area < min_area:
        continue
      hist = np.bincount(label[comp], minlength=len(_NAMES))
      major = np.nonzero(hist >= max(min_area, self.split_frac * area))[0]
      # A shape (or touching shapes) is nearly uniform in colour; noise is not.
      if hist[major].sum() < self.purity * area:
        continue
      if len(major) == 1:
        yield comp, int(major[0])
        continue
      for c in major:
        sub, m = connected_components(comp & (label == c), 4)
        for j in range(1, m + 1):
          part = sub == j
          if part.sum() >= min_area:
            yield part, int(c)

  def detect(self, image: np.ndarray) -> dict[str, list[Detection]]:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] < 3:
      raise ValueError(f"expected an HxWx3 image, got shape {image.shape}")
    image = image[..., :3]
    label, alpha, strength = classify_pixels(image)
    fg = (alpha >= self.min_alpha) & (strength >= self.min_strength)
    min_area = max(4, int(round(self.min_area_frac * fg.size)))
    found: dict[str, list[tuple[int, Detection]]] = {}
    for mask, color in self._objects(label, fg, min_area):
      shape = classify_shape(mask, np.where(label == color, alpha, 0.0))
      if shape is None:
        continue
      ys, xs = np.nonzero(mask)
      box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
      found.setdefault(shape, []).append((len(ys), Detection(box, 1.0, _NAMES[color], mask)))
    return {k: [d for _, d in sorted(v, key=lambda t: -t[0])] for k, v in found.items()}


def get_detector(name: str = "shapes", **kwargs) -> Detector:
  """Detector by name: ``"shapes"`` (built in). Others import lazily."""
  if name == "shapes":
    return ShapesWorldDetector(**kwargs)
  if name in ("mask2former", "mmdet"):
    try:
      import mmdet  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError as e:
      raise ImportError(
          "the mask2former detector needs mmdet 2.x, open_clip and GenEval's weights; "
          "it is not bundled (use --detector shapes offline)") from e
    raise NotImplementedError("mask2former adapter not implemented yet")
  raise ValueError(f"unknown detector {name!r}; available: shapes")
