"""Image files and grids: uint8 HxWx3 arrays in, PNGs out."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image


def make_grid(images: Sequence[np.ndarray], cols: int | None = None, pad: int = 1) -> np.ndarray:
  """Tile equally sized HxWx3 uint8 images (row-major, ``pad`` px black gaps)."""
  if not images:
    raise ValueError("no images to tile")
  h, w = images[0].shape[:2]
  cols = cols or math.ceil(math.sqrt(len(images)))
  rows = math.ceil(len(images) / cols)
  grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), np.uint8)
  for k, im in enumerate(images):
    r, c = divmod(k, cols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = im[..., :3]
  return grid


def save_png(image: np.ndarray, path: str) -> None:
  """Writes a uint8 HxW[xC] array as a PNG."""
  Image.fromarray(np.asarray(image, np.uint8)).save(path)


def load_image(path: str) -> np.ndarray:
  """An image file as uint8 HxWx3 RGB."""
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))
