"""GenEval's image-folder layout: reading, writing and completeness checks.

::

  DIR/00000/metadata.jsonl      the prompt's metadata (one JSON object)
  DIR/00000/samples/0000.png    samples, numbered from 0000
  DIR/00000/grid.png            a tile of that prompt's samples
  DIR/grid.png                  a tile of the first prompts (written by ``render``)
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterator, Sequence

import numpy as np

from ec_dit.images import load_image, make_grid, save_png

__all__ = ["check_folder", "iter_prompt_folders", "load_image", "make_grid", "prompt_dir",
           "prompt_indices", "read_metadata", "sample_files", "save_png", "write_prompt_folder"]

_SAMPLE = re.compile(r"^\d+\.png$")


def prompt_dir(root: str, index: int) -> str:
  """``root/00000`` for prompt ``index``."""
  return os.path.join(root, f"{index:05d}")


def write_prompt_folder(root: str, index: int, metadata: dict, images: Sequence[np.ndarray],
                        grid: bool = True) -> str:
  """Write one prompt's folder (metadata, samples, optional grid); returns it."""
  d = prompt_dir(root, index)
  os.makedirs(os.path.join(d, "samples"), exist_ok=True)
  with open(os.path.join(d, "metadata.jsonl"), "w") as f:
    f.write(json.dumps(metadata) + "\n")
  for j, im in enumerate(images):
    save_png(im, os.path.join(d, "samples", f"{j:04d}.png"))
  if grid:
    save_png(make_grid(images, cols=len(images)), os.path.join(d, "grid.png"))
  return d


def read_metadata(folder: str) -> dict:
  path = os.path.join(folder, "metadata.jsonl")
  with open(path) as f:
    text = f.read().strip()
  try:
    return json.loads(text.splitlines()[0] if text else "")
  except (json.JSONDecodeError, IndexError) as e:
    raise ValueError(f"{path}: not a JSON object ({e})") from None


def sample_files(folder: str) -> list[str]:
  """Sample PNG paths of a prompt folder, in numeric order."""
  sdir = os.path.join(folder, "samples")
  if not os.path.isdir(sdir):
    return []
  names = [n for n in os.listdir(sdir) if _SAMPLE.match(n) and os.path.isfile(os.path.join(sdir, n))]
  return [os.path.join(sdir, n) for n in sorted(names, key=lambda n: int(n[:-4]))]


def prompt_indices(root: str) -> list[int]:
  """The indices of the numeric prompt folders under ``root``, sorted."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"image folder {root!r} does not exist")
  return sorted(int(s) for s in os.listdir(root) if s.isdigit() and os.path.isdir(os.path.join(root, s)))


def iter_prompt_folders(root: str) -> Iterator[tuple[str, dict, list[str]]]:
  """``(folder, metadata, sample paths)`` for every numeric subfolder, in order."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"image folder {root!r} does not exist")
  subs = sorted((s for s in os.listdir(root) if s.isdigit() and os.path.isdir(os.path.join(root, s))), key=int)
  for s in subs:
    folder = os.path.join(root, s)
    yield folder, read_metadata(folder), sample_files(folder)


def check_folder(root: str, prompts: Sequence[dict], n_samples: int = 4) -> list[str]:
  """Problems that keep ``root`` from being a complete run of ``prompts``.

  Checks every prompt folder exists, has ``metadata.jsonl`` equal to its
  prompt, and samples ``0000.png .. n-1`` and no others (an extra one is
  reported once, as "extra"). Returns human-readable problems (empty when complete).
  """
  problems = []
  for i, p in enumerate(prompts):
    d = prompt_dir(root, i)
    if not os.path.isdir(d):
      problems.append(f"{d}: missing prompt folder ({p['prompt']!r})")
      continue
    if not os.path.isfile(os.path.join(d, "metadata.jsonl")):
      problems.append(f"{d}: missing metadata.jsonl")
    else:
      try:
        meta = read_metadata(d)
        if meta != p:
          problems.append(f"{d}/metadata.jsonl: does not match prompt {i} ({p['prompt']!r})")
      except ValueError as e:
        problems.append(str(e))
    missing = [f"{j:04d}.png" for j in range(n_samples)
               if not os.path.isfile(os.path.join(d, "samples", f"{j:04d}.png"))]
    if missing:
      problems.append(f"{d}/samples: missing {', '.join(missing)}")
    extra = [os.path.basename(f) for f in sample_files(d) if int(os.path.basename(f)[:-4]) >= n_samples]
    if extra:
      problems.append(f"{d}/samples: extra {', '.join(extra)} (expected {n_samples} samples, "
                      f"0000.png..{n_samples - 1:04d}.png)")
  extra = [s for s in os.listdir(root) if s.isdigit() and int(s) >= len(prompts)] if os.path.isdir(root) else []
  if extra:
    problems.append(f"{root}: {len(extra)} folder(s) beyond the {len(prompts)} prompts, e.g. {sorted(extra)[0]}")
  return problems
