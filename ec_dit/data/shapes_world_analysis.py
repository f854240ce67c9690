"""ShapesWorld helpers for looking inside a model trained on it: single-object prompts grouped by shape or
colour, and which pixels (and tokens) hold an object rather than the grey background.

Used by the routing maps (`ec_dit.routing_maps`): object outlines over the maps, and
expert specialisation per group, over all tokens or the objects' tokens.
"""

from __future__ import annotations

import numpy as np

from ec_dit.data.shapes_world import BACKGROUND, COLOR_NAMES
from ec_dit.vocabulary import SHAPES, with_article


def foreground(image: np.ndarray) -> np.ndarray:
  """1 where a pixel differs from ShapesWorld's grey background (for the objects' outlines)."""
  return (np.max(np.abs(image[..., :3].astype(np.int32) - np.array(BACKGROUND)), axis=-1) > 40).astype(float)


def object_tokens(images: np.ndarray, patch_size: int) -> np.ndarray:
  """[B, S] 1 for tokens whose patch holds any object pixel (ShapesWorld: not the grey background)."""
  fg = np.stack([foreground(im) for im in images])
  b, h, w = fg.shape
  patches = fg.reshape(b, h // patch_size, patch_size, w // patch_size, patch_size)
  return (patches.max(axis=(2, 4)) > 0).reshape(b, -1).astype(np.float32)


def shapes_world_groups(by: str = "shape") -> dict[str, list[str]]:
  """ShapesWorld single-object prompts "a photo of a {colour} {shape}", grouped by shape or by colour."""
  if by not in ("shape", "color"):
    raise ValueError(f"by must be 'shape' or 'color', got {by!r}")
  groups: dict[str, list[str]] = {}
  for shape in SHAPES:
    for colour in COLOR_NAMES:
      groups.setdefault(shape if by == "shape" else colour, []).append(f"a photo of {with_article(colour)} {shape}")
  return groups
