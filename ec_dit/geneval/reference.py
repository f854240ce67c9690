"""The prompts an image folder must hold: scores come from these, never from the folder's own metadata.

A folder's `metadata.jsonl` files are only a copy: a line without `include`
would score every image correct, an unknown `tag` would become a task of its own.
So evaluation takes each prompt's task and clauses from a reference, in order:

1. `--prompts FILE`;
2. the `prompts.jsonl` that `generate` / `render` (and `--mode=evaluate`) wrote
   beside the images (`IMAGES/prompts.jsonl` or `IMAGES/../prompts.jsonl`);
3. a prompt set the package ships: GenEval's official 553 prompts (the COCO domain,
   seed 43, which reproduces `evaluation_metadata.jsonl`) or the default ShapesWorld set,
   when every prompt folder's metadata equals that set's prompt at its index.

Every prompt folder's metadata must then equal its reference prompt; any that
differs (or is malformed) is refused with an `EvaluationError` naming the file.
"""

from __future__ import annotations

import collections
import os

from ec_dit import errors
from ec_dit.geneval import layout, prompts as prompts_lib

PROMPTS_FILE = "prompts.jsonl"
# (name, domain, seed, per_task) of the prompt sets the package can regenerate exactly
SHIPPED = (("GenEval's official evaluation_metadata.jsonl", "coco", 43, 100),
           ("the default ShapesWorld prompt set", "shapes", 0, 100))


def write_beside(prompts, images: str) -> str:
  """Writes `images/prompts.jsonl` (the reference `evaluate` reads); returns its path."""
  os.makedirs(images, exist_ok=True)
  path = os.path.join(images, PROMPTS_FILE)
  prompts_lib.write_prompts(prompts, path)
  return path


def _folder_metadata(images: str) -> dict[int, dict]:
  """{index: metadata} of every prompt folder with a metadata.jsonl, each validated (a PromptError names it)."""
  found = {}
  for i in layout.prompt_indices(images):
    folder = layout.prompt_dir(images, i)
    path = os.path.join(folder, "metadata.jsonl")
    if os.path.isfile(path):
      found[i] = prompts_lib.validate_prompt(layout.read_metadata(folder), path)
  return found


def reference_prompts(images: str, prompts_file: str | None = None) -> tuple[list[dict], str]:
  """(the prompts `images` must hold, where they come from); raises EvaluationError if there is no reference."""
  if prompts_file:
    return prompts_lib.load_prompts(prompts_file), prompts_file
  for path in (os.path.join(images, PROMPTS_FILE), os.path.join(os.path.dirname(os.path.abspath(images)),
                                                                PROMPTS_FILE)):
    if os.path.isfile(path):
      return prompts_lib.load_prompts(path), path
  found = _folder_metadata(images)
  for name, domain, seed, per_task in SHIPPED:
    suite = prompts_lib.generate_suite(prompts_lib.DOMAINS[domain], seed, per_task)
    if found and all(i < len(suite) and suite[i] == m for i, m in found.items()):
      return suite, name
  raise errors.EvaluationError(
      f"{images}: no {PROMPTS_FILE} beside the images, and their metadata is not a prompt set the package ships "
      f"(GenEval's official prompts, the default ShapesWorld set): pass --prompts FILE, the prompt file the images "
      f"were generated from (scores never come from the folders' own metadata)")


def check_metadata(images: str, prompts: list[dict], source: str) -> None:
  """Every prompt folder's metadata.jsonl must equal its reference prompt; raises EvaluationError naming the files."""
  bad = []
  for i in layout.prompt_indices(images):
    path = os.path.join(layout.prompt_dir(images, i), "metadata.jsonl")
    if i >= len(prompts) or not os.path.isfile(path):
      continue  # an extra or incomplete folder: check_folder reports it
    try:
      meta = layout.read_metadata(layout.prompt_dir(images, i))
    except (OSError, ValueError) as e:
      bad.append(f"{path} ({e})")
      continue
    if meta != prompts[i]:
      bad.append(path)
  if bad:
    raise errors.EvaluationError(
        f"{len(bad)} metadata file(s) disagree with the reference prompts ({source}), e.g. {bad[0]}: the task and "
        f"clauses are taken from the reference; regenerate the folder, or pass the right --prompts")


def common_sample_count(images: str) -> int:
  """The sample count most prompt folders have (ties: the larger): one folder with an extra sample does not
  make every other folder 'missing' it."""
  counts = collections.Counter(len(layout.sample_files(layout.prompt_dir(images, i)))
                               for i in layout.prompt_indices(images))
  if not counts:
    return 0
  top = max(counts.values())
  return max(n for n, c in counts.items() if c == top)
