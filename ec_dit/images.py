"""Image files and grids: uint8 HxWx3 arrays in, PNGs out."""
from __future__ import annotations

import json
import math
import re
import sys
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


SLUG_LEN = 60  # characters of the prompt kept in a file name; the full prompt goes to the sidecar


def prompt_stem(index: int, prompt: str, seed: int) -> str:
  """`{index:03d}_{slug}_{seed}`: a file-name stem unique per prompt of a call (two prompts that reduce to the
  same slug, "A red square!" and "a red square", differ by their index). A slug cut to SLUG_LEN characters
  prints a warning; `write_prompt_sidecar` keeps the full prompt."""
  slug = re.sub(r"[^\w]+", "_", prompt.lower()).strip("_")
  stem = f"{index:03d}_{slug[:SLUG_LEN].rstrip('_') or 'unconditional'}_{seed}"
  if len(slug) > SLUG_LEN:
    print(f"warning: prompt {index} is longer than {SLUG_LEN} characters in its file names ({stem}*); the full "
          f"prompt is in {stem}.json", file=sys.stderr, flush=True)
  return stem


def write_prompt_sidecar(path: str, prompt: str, **fields) -> str:
  """Writes `{"prompt": prompt, **fields}` as JSON to `path` (the full prompt of files named by `prompt_stem`)."""
  with open(path, "w", encoding="utf-8") as f:
    json.dump({"prompt": prompt, **fields}, f, ensure_ascii=False, indent=1)
  return path
