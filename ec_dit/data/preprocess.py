"""Per-example preprocessing: decode, RGB, centre crop, resize, scale to [-1, 1], tokenize.

An example that cannot be used (an image that does not decode, a zero-byte
file, a caption file that is not UTF-8) raises `BadExampleError` naming the
file and what to do. With `config.input.skip_bad_examples` the pipeline passes
the unshuffled source in, and a bad example is replaced by the next good one in
source order, its batch row flagged in `"bad"` (the loop counts them).
"""
from __future__ import annotations

import io
import os
import sys
import warnings
from typing import Any, Callable, Mapping

import grain
import numpy as np
from PIL import Image

from ec_dit import errors

Tokenize = Callable[[str], tuple[np.ndarray, np.ndarray]]


def _by_range(a: np.ndarray, mode: str) -> Image.Image:
  """An 8-bit grey image from a float ("F") or 16/32-bit integer image, scaled by the range its values use:
  floats in [0, 1] (x 255) or [0, 255]; integers in [0, 255] (as they are) or [0, 65535] (/ 257, 16-bit). Values
  outside every known range (negative, NaN, over 65535) raise ValueError: the caller skips and lists the image."""
  if a.size and not np.isfinite(a).all():
    raise ValueError(f"{mode} image has non-finite values")
  lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
  if lo < 0 or hi > 65535:
    raise ValueError(f"{mode} image values span [{lo:g}, {hi:g}], outside the known ranges [0, 1], [0, 255] and "
                     f"[0, 65535]")
  if mode == "F":
    scale = 255.0 if hi <= 1.0 else 1.0 if hi <= 255.0 else 1 / 257.0
  else:
    scale = 1 / 257.0 if mode.startswith("I;16") or hi > 255 else 1.0
  return Image.fromarray(np.clip(np.round(a * scale), 0, 255).astype(np.uint8))


def to_rgb(img: Image.Image) -> Image.Image:
  """RGB version of a PIL image; transparent pixels are composited on white; float and 16/32-bit grey images
  are scaled by their real range (`_by_range`), never clipped to black."""
  if img.mode == "P":
    img = img.convert("RGBA" if "transparency" in img.info else "RGB")
  if img.mode in ("RGBA", "LA", "RGBa", "La"):
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
    img = _by_range(np.asarray(img, np.float64), img.mode)
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
  """(width, height) of a path or encoded bytes (reading only the header, so Pillow's decompression-bomb
  warning is silenced: the caller compares the size with its own limit), or of an array."""
  if isinstance(image, (str, os.PathLike, bytes, np.bytes_)):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      with Image.open(image if isinstance(image, (str, os.PathLike)) else io.BytesIO(bytes(image))) as f:
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


class BadExampleError(errors.DataError):
  """An example that cannot be decoded; the message names its file (or index) and what to do."""


def caption_text(caption: Any) -> str:
  """A caption feature (str, bytes, or a 0-d numpy array of either) as text; UnicodeDecodeError if not UTF-8."""
  if isinstance(caption, np.ndarray) and caption.ndim == 0:
    caption = caption.item()
  if isinstance(caption, (bytes, np.bytes_)):
    caption = bytes(caption).decode("utf-8")
  return str(caption)


class UnreadableCaption:
  """Stands for a caption that could not be read (a source keeps it so the example is skipped when drawn)."""

  def __init__(self, reason: str):
    self.reason = reason

  def __repr__(self) -> str:
    return f"UnreadableCaption({self.reason!r})"


INDEX_KEY = "__source_index__"  # added to each example in skip mode (`Indexed`)
MAX_SKIP = 1000  # consecutive bad examples tried before giving up


class Indexed:
  """A random-access source whose examples carry their index (for skip mode)."""

  def __init__(self, source):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    return {**self.source[int(index)], INDEX_KEY: int(index)}


def _what_to_do(skip: bool) -> str:
  return ("" if skip else " Delete or replace it, or set config.input.skip_bad_examples=True to skip bad examples "
          "(each is replaced by the next good one and counted in metrics.jsonl).")


class Preprocess(grain.transforms.Map):
  """Example -> ``{"image": float32 [H, W, 3] in [-1, 1], "tokens": int32 [L], "mask": bool [L]}``.

  With `source` (skip mode), the example must come from `Indexed(source)`: a bad
  one is replaced by the next good example of `source` and the output gains
  ``"bad": int32`` (1 for a replaced example).
  """

  def __init__(self, image_size: int, tokenize: Tokenize, image_key: str = "image",
               caption_key: str = "caption", source=None):
    self.image_size, self.tokenize = int(image_size), tokenize
    self.image_key, self.caption_key = image_key, caption_key
    self.source = source

  def map(self, example: Mapping[str, Any]) -> dict:
    if self.source is None:
      return self._decode(example, skip=False)
    index = example[INDEX_KEY]
    for k in range(MAX_SKIP):
      try:
        out = self._decode(example, skip=True)
        return {**out, "bad": np.int32(k > 0)}
      except BadExampleError as e:
        print(f"skipping a bad example: {e}", file=sys.stderr, flush=True)
        example = self.source[(index + k + 1) % len(self.source)]
    raise BadExampleError(f"config.input.source: {MAX_SKIP} bad examples in a row from index {index}: "
                          f"is the source readable at all?")

  def _decode(self, example: Mapping[str, Any], skip: bool) -> dict:
    for key in (self.image_key, self.caption_key):
      if key not in example:
        field = "image_key" if key == self.image_key else "caption_key"
        raise KeyError(f"config.input.{field}: example has no feature {key!r}; it has {sorted(example)}")
    raw = example[self.image_key]
    name = f"image {raw}" if isinstance(raw, (str, os.PathLike)) else f"the image of example {example.get(INDEX_KEY, '?')}"
    caption = example[self.caption_key]
    if isinstance(caption, UnreadableCaption):
      raise BadExampleError(f"config.input.source: {caption.reason}.{_what_to_do(skip)}")
    try:
      image = load_image(raw, self.image_size)
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a corrupt file
      raise BadExampleError(f"config.input.source: cannot decode {name} ({type(e).__name__}: {e})."
                            f"{_what_to_do(skip)}") from None
    try:
      caption = caption_text(caption)
    except UnicodeDecodeError as e:
      raise BadExampleError(f"config.input.source: the caption of {name} is not UTF-8 ({e})."
                            f"{_what_to_do(skip)}") from None
    tokens, mask = self.tokenize(caption)
    return {
        "image": image.astype(np.float32) / np.float32(127.5) - np.float32(1.0),
        "tokens": np.asarray(tokens, np.int32),
        "mask": np.asarray(mask, np.bool_),
    }
