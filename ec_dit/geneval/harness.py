"""In-process harness API: render ground truth, evaluate folders, one image at a time.

The CLI (:mod:`ec_dit.geneval.cli`) is a thin wrapper over these functions;
a training loop can call them directly::

  from ec_dit.geneval import harness, scores
  rows = harness.evaluate_images("out/images", "out/results.jsonl")
  print(scores.format_summary(scores.summarize(rows)))
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from ec_dit.data.shapes_world import render_from_metadata
from ec_dit import errors
from ec_dit.geneval import layout, prompts as prompts_lib, reference, rules
from ec_dit.geneval.detectors import Detector, get_detector


def _progress(it, enabled, **kw):
  if not enabled:
    return it
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(it, **kw)


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> list[int]:
  """Seed of ground-truth sample ``(prompt, sample)`` (independent streams)."""
  return [int(seed), int(prompt_index), int(sample_index)]


def render_prompts(prompts: Sequence[dict], out_dir: str, n: int = 4, size: int = 32, seed: int = 0,
                   noise_std: float = 0.0, grid_prompts: int = 16, progress: bool = False) -> None:
  """Write ShapesWorld ground truth for ``prompts`` in GenEval's layout.

  ``out_dir/grid.png`` tiles the samples of the first ``grid_prompts``
  prompts (one row per prompt).
  """
  os.makedirs(out_dir, exist_ok=True)
  tiles = []
  for i, p in enumerate(_progress(prompts, progress, desc="render", unit="prompt")):
    try:
      imgs = [render_from_metadata(p, size, sample_seed(seed, i, j), noise_std) for j in range(n)]
    except ValueError as e:
      raise ValueError(f"prompt {i} ({p.get('prompt')!r}): {e}") from None
    layout.write_prompt_folder(out_dir, i, p, imgs)
    if i < grid_prompts:
      tiles.extend(imgs)
  if tiles:
    layout.save_png(layout.make_grid(tiles, cols=n), os.path.join(out_dir, "grid.png"))
  reference.write_beside(prompts, out_dir)


def evaluate_image(image: np.ndarray, metadata: dict, detector: Detector,
                   color_classifier: rules.ColorClassifier = rules.detection_colors,
                   threshold: float = rules.THRESHOLD, counting_threshold: float = rules.COUNTING_THRESHOLD,
                   max_objects: int = rules.MAX_OBJECTS, margin: float = rules.POSITION_THRESHOLD):
  """Judge one image; returns ``(correct, reason, kept detections by class)``."""
  found = detector.detect(image)
  kept = rules.select_detections(found, metadata["tag"], threshold, counting_threshold, max_objects)
  correct, reason = rules.evaluate(image, kept, metadata, color_classifier, margin)
  return correct, reason, kept


def result_row(filename: str, metadata: dict, correct: bool, reason: str, kept) -> dict:
  """A row with the official ``results.jsonl`` fields."""
  return {
      "filename": filename,
      "tag": metadata["tag"],
      "prompt": metadata["prompt"],
      "correct": bool(correct),
      "reason": reason,
      "metadata": json.dumps(metadata),
      "details": json.dumps({k: [d.as_list() for d in v] for k, v in kept.items()}),
  }


def write_results(rows: Sequence[dict], path: str) -> None:
  """Write rows as JSON lines (readable by GenEval's ``summary_scores.py``)."""
  if os.path.dirname(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")


def evaluate_images(image_dir: str, out: str | None = None, detector: str | Detector = "shapes",
                    color_classifier: rules.ColorClassifier = rules.detection_colors,
                    progress: bool = False, prompts: Sequence[dict] | None = None, **rule_kwargs) -> list[dict]:
  """Evaluate every sample under ``image_dir`` (GenEval layout).

  Args:
    image_dir: folder with ``00000/metadata.jsonl`` and ``00000/samples/*.png``.
    out: optional ``results.jsonl`` path to write.
    detector: a :class:`~ec_dit.geneval.detectors.Detector` or its name.
    color_classifier: colour classifier for detectors that attach no colour.
    progress: show a tqdm bar.
    prompts: the reference prompts (`ec_dit.geneval.reference`); folder i is judged by ``prompts[i]``
      (default: ``reference.reference_prompts(image_dir)``). A folder whose metadata disagrees is refused.
    **rule_kwargs: ``threshold``, ``counting_threshold``, ``max_objects``,
      ``margin`` (GenEval's defaults otherwise).

  Returns:
    One row per image (see :func:`result_row`). An unreadable image or a folder
    beyond the prompts raises EvaluationError naming the file.
  """
  det = get_detector(detector) if isinstance(detector, str) else detector
  if prompts is None:
    prompts, source = reference.reference_prompts(image_dir)
  else:
    source = "the prompts given"
  prompts = [prompts_lib.validate_prompt(p, f"prompt {i}") for i, p in enumerate(prompts)]
  reference.check_metadata(image_dir, prompts, source)
  jobs = []
  for i in layout.prompt_indices(image_dir):
    paths = layout.sample_files(layout.prompt_dir(image_dir, i))
    if paths and i >= len(prompts):
      raise errors.EvaluationError(f"{layout.prompt_dir(image_dir, i)}: extra prompt folder beyond the "
                                   f"{len(prompts)} prompts of {source}")
    jobs += [(path, prompts[i]) for path in paths]
  rows = []
  for path, meta in _progress(jobs, progress, desc="evaluate", unit="img"):
    try:
      image = layout.load_image(path)
    except Exception as e:  # noqa: BLE001 - corrupt, truncated or not an image: name the file
      raise errors.EvaluationError(f"{path}: cannot read the image ({type(e).__name__}: {e})") from None
    ok, reason, kept = evaluate_image(image, meta, det, color_classifier, **rule_kwargs)
    rows.append(result_row(path, meta, ok, reason, kept))
  if out:
    write_results(rows, out)
  return rows
