"""Per-example preprocessing: decode, RGB, centre crop, resize, scale to [-1, 1], tokenize."""
from __future__ import annotations

import io
import os
from typing import Any, Callable, Mapping

import grain
import numpy as np
from PIL import Image

Tokenize = Callable[[str], tuple[np.ndarray, np.ndarray]]


def to_rgb(img: Image.Image) -> Image.Image:
  """RGB version of a PIL image; transparent pixels are composited on white."""
  if img.mode == "P":
    img = img.convert("RGBA" if "transparency" in img.info else "RGB")
  if img.mode in ("RGBA", "LA", "RGBa", "La"):
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits
    a = np.asarray(img, np.float64)
    img = Image.fromarray(np.clip(a / 257.0, 0, 255).astype(np.uint8))
  return img.convert("RGB")


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
  """Centre square crop (side = the shorter side), then bicubic resize to ``size``."""
  w, h = img.size
  s = min(w, h)
  if (w, h) != (s, s):
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s))
  if s != size:
    img = img.resize((size, size), Image.Resampling.BICUBIC)
  return img


def image_size_of(image: Any) -> tuple[int, int]:
  """(width, height) of a path or encoded bytes (reading only the header), or of an array."""
  if isinstance(image, (str, os.PathLike)):
    with Image.open(image) as f:
      return f.size
  if isinstance(image, (bytes, np.bytes_)):
    with Image.open(io.BytesIO(bytes(image))) as f:
      return f.size
  a = np.asarray(image)
  return (int(a.shape[1]), int(a.shape[0]))


def load_image(image: Any, size: int) -> np.ndarray:
  """uint8 ``(size, size, 3)`` from a path, encoded bytes or an array (HW, HW1, HW3, HW4)."""
  if isinstance(image, (str, os.PathLike)):
    with Image.open(image) as f:
      pil = to_rgb(f)
  elif isinstance(image, (bytes, np.bytes_)):
    with Image.open(io.BytesIO(bytes(image))) as f:
      pil = to_rgb(f)
  else:
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] == 3 and a.dtype == np.uint8 and a.shape[:2] == (size, size):
      return a  # fast path: already the right size (ShapesWorld)
    if a.ndim == 3 and a.shape[-1] == 1:
      a = a[..., 0]
    if a.dtype != np.uint8 or a.ndim not in (2, 3):
      raise ValueError(f"image array must be uint8 HxW[xC], got {a.dtype} {a.shape}")
    pil = to_rgb(Image.fromarray(a))
  return np.asarray(center_crop_resize(pil, size), np.uint8)


class Preprocess(grain.transforms.Map):
  """Example -> ``{"image": float32 [H, W, 3] in [-1, 1], "tokens": int32 [L], "mask": bool [L]}``."""

  def __init__(self, image_size: int, tokenize: Tokenize, image_key: str = "image",
               caption_key: str = "caption"):
    self.image_size, self.tokenize = int(image_size), tokenize
    self.image_key, self.caption_key = image_key, caption_key

  def map(self, example: Mapping[str, Any]) -> dict:
    for key in (self.image_key, self.caption_key):
      if key not in example:
        field = "image_key" if key == self.image_key else "caption_key"
        raise KeyError(f"config.input.{field}: example has no feature {key!r}; it has {sorted(example)}")
    image = load_image(example[self.image_key], self.image_size)
    caption = example[self.caption_key]
    if isinstance(caption, np.ndarray) and caption.ndim == 0:
      caption = caption.item()
    if isinstance(caption, (bytes, np.bytes_)):
      caption = bytes(caption).decode("utf-8")
    tokens, mask = self.tokenize(str(caption))
    return {
        "image": image.astype(np.float32) / np.float32(127.5) - np.float32(1.0),
        "tokens": np.asarray(tokens, np.int32),
        "mask": np.asarray(mask, np.bool_),
    }
