"""``python -m ec_dit.geneval <command>``: prompts, validate, render, generate, evaluate, summary."""
from __future__ import annotations

import argparse
import os
import sys

from ec_dit import errors
from ec_dit.geneval import generate, harness, layout, prompts as prompts_lib, reference, scores as scores_lib
from ec_dit.inference import TextToImagePipeline


def _cmd_prompts(a) -> int:
  suite = prompts_lib.generate_suite(prompts_lib.DOMAINS[a.domain], a.seed, a.per_task)
  prompts_lib.write_prompts(suite, a.out)
  counts = prompts_lib.count_tasks(suite)
  print(f"wrote {len(suite)} prompts to {a.out}: " + ", ".join(f"{t} {n}" for t, n in counts.items()))
  return 0


def _cmd_validate(a) -> int:
  ps = prompts_lib.load_prompts(a.prompts)
  counts = prompts_lib.count_tasks(ps)
  print(f"{a.prompts}: {len(ps)} prompts")
  for t, n in counts.items():
    print(f"  {t:<16} {n:>5d}")
  if a.images:
    problems = layout.check_folder(a.images, ps, a.n)
    if problems:
      _print_problems(a.images, problems)
      return 1
    print(f"{a.images}: complete ({len(ps)} prompts x {a.n} samples)")
  return 0


def _cmd_render(a) -> int:
  ps = prompts_lib.load_prompts(a.prompts)
  harness.render_prompts(ps, a.out, n=a.n, size=a.size, seed=a.seed, noise_std=a.noise, progress=not a.quiet)
  print(f"rendered {len(ps)} prompts x {a.n} samples at {a.size}px into {a.out}")
  return 0


def _print_problems(folder: str, problems: list[str]) -> None:
  print(f"{folder}: INCOMPLETE, {len(problems)} problem(s):")
  for p in problems[:50]:
    print(f"  {p}")
  if len(problems) > 50:
    print(f"  ... and {len(problems) - 50} more")


def _expected(a) -> tuple[list, int, str]:
  """(the reference prompts, samples per prompt, where the prompts come from): --prompts, else the prompts.jsonl
  generate wrote, else a prompt set the package ships (`ec_dit.geneval.reference`); never the folder's metadata."""
  ps, source = reference.reference_prompts(a.images, a.prompts)
  n = a.n or (4 if a.prompts else reference.common_sample_count(a.images) or 4)
  return ps, n, source


def _missing_rows(root: str, ps: list, n: int) -> list[dict]:
  """An incorrect row for every expected sample that is not there (--allow-incomplete)."""
  rows = []
  for i, p in enumerate(ps):
    for j in range(n):
      path = os.path.join(layout.prompt_dir(root, i), "samples", f"{j:04d}.png")
      if not os.path.isfile(path):
        rows.append(harness.result_row(path, p, False, "missing image", {}))
  return rows


def _cmd_evaluate(a) -> int:
  ps, n, source = _expected(a)
  reference.check_metadata(a.images, ps, source)  # metadata that disagrees is refused, incomplete or not
  problems = layout.check_folder(a.images, ps, n)
  if problems and not a.allow_incomplete:
    _print_problems(a.images, problems)
    print("not evaluated: an incomplete folder would score only the images present. Complete it, or pass "
          "--allow-incomplete to count each missing image as incorrect.")
    return 1
  rows = harness.evaluate_images(a.images, None, detector=a.detector, progress=not a.quiet, prompts=ps,
                                 threshold=a.threshold, counting_threshold=a.counting_threshold,
                                 max_objects=a.max_objects, margin=a.position_threshold)
  rows = [r for r in rows if int(os.path.basename(r["filename"])[:-4]) < n]  # extra samples are not scored
  missing = _missing_rows(a.images, ps, n) if a.allow_incomplete else []
  rows += missing
  if not rows:
    print(f"no samples found under {a.images}", file=sys.stderr)
    return 1
  harness.write_results(rows, a.out)
  print(f"evaluated {len(rows) - len(missing)} images against {source}; wrote {a.out}")
  if a.allow_incomplete:
    expected = len(ps) * n
    print(f"coverage: {expected - len(missing)}/{expected} images ({(expected - len(missing)) / max(expected, 1):.1%}); "
          f"{len(missing)} missing image(s) counted as incorrect")
  print(scores_lib.format_summary(scores_lib.summarize(rows)))
  return 0


def _cmd_generate(a) -> int:
  ps = prompts_lib.load_prompts(a.prompts)
  pipe = TextToImagePipeline.from_run(a.workdir, step=a.step, batch_size=a.batch_size)
  generate.generate_into(pipe, ps, a.out, n=a.n, seed=a.seed, progress=not a.quiet)
  print(f"generated {len(ps)} prompts x {a.n} samples into {a.out}")
  return 0


def _cmd_summary(a) -> int:
  print(scores_lib.format_summary(scores_lib.summarize(a.results)))
  return 0


def _image_folder_args(s, prompts_help: str, out_help: str, seed_help: str) -> None:
  """The arguments of the commands that write n images per prompt into a folder."""
  s.add_argument("--prompts", required=True, help=prompts_help)
  s.add_argument("--out", required=True, help=out_help)
  s.add_argument("--n", type=int, default=4, help="samples per prompt (default 4)")
  s.add_argument("--seed", type=int, default=0, help=f"{seed_help} (default 0)")
  s.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m ec_dit.geneval",
      description="GenEval-style text-to-image evaluation on a CPU, with the embedded ShapesWorld domain.")
  sub = p.add_subparsers(dest="command", required=True, metavar="command")

  s = sub.add_parser("prompts", help="write a prompt file in GenEval's format")
  s.add_argument("--domain", choices=sorted(prompts_lib.DOMAINS), default="shapes",
                 help="vocabulary: ShapesWorld shapes or the 80 COCO classes (default: shapes)")
  s.add_argument("--out", required=True, help="output .jsonl file")
  s.add_argument("--seed", type=int, default=43, help="random seed (default 43, GenEval's)")
  s.add_argument("--per-task", type=int, default=100, help="prompts drawn per task before de-duplication")
  s.set_defaults(fn=_cmd_prompts)

  s = sub.add_parser("validate", help="check a prompt file (and optionally an image folder)")
  s.add_argument("--prompts", required=True, help="prompt .jsonl file")
  s.add_argument("--images", help="image folder to check for completeness")
  s.add_argument("--n", type=int, default=4, help="samples expected per prompt (default 4)")
  s.set_defaults(fn=_cmd_validate)

  s = sub.add_parser("render", help="render ShapesWorld ground truth for a prompt file")
  _image_folder_args(s, "prompt .jsonl file (ShapesWorld classes)", "output image folder", "random seed")
  s.add_argument("--size", type=int, default=32, help="canvas size in pixels (default 32)")
  s.add_argument("--noise", type=float, default=0.0, help="Gaussian pixel noise std (default 0)")
  s.set_defaults(fn=_cmd_render)

  s = sub.add_parser("generate", help="generate samples for a prompt file from a training run")
  s.add_argument("--workdir", required=True, help="training run directory (config.json + checkpoints/)")
  _image_folder_args(s, "prompt .jsonl file", "output image folder (GenEval's layout)", "sampling seed")
  s.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  s.add_argument("--batch-size", type=int, default=64, help="images per jitted call (default 64)")
  s.set_defaults(fn=_cmd_generate)

  s = sub.add_parser("evaluate", help="score an image folder with GenEval's rules")
  s.add_argument("--images", required=True, help="image folder in GenEval's layout")
  s.add_argument("--out", default="results.jsonl", help="results file (default results.jsonl)")
  s.add_argument("--prompts", help="prompt .jsonl file the folder should hold (default: the prompts.jsonl that "
                 "generate wrote beside the images, else a prompt set the package ships, e.g. GenEval's official)")
  s.add_argument("--n", type=int, default=None,
                 help="samples expected per prompt (default: 4 with --prompts, else the most any prompt has)")
  s.add_argument("--allow-incomplete", action="store_true",
                 help="score an incomplete folder, counting each missing image as incorrect (prints the coverage)")
  s.add_argument("--detector", default="shapes", help="object detector (default: shapes)")
  s.add_argument("--threshold", type=float, default=0.3, help="confidence threshold (default 0.3)")
  s.add_argument("--counting-threshold", type=float, default=0.9, help="threshold for counting (default 0.9)")
  s.add_argument("--max-objects", type=int, default=16, help="detections kept per class (default 16)")
  s.add_argument("--position-threshold", type=float, default=0.1, help="position margin factor (default 0.1)")
  s.add_argument("--quiet", action="store_true", help="no progress bar")
  s.set_defaults(fn=_cmd_evaluate)

  s = sub.add_parser("summary", help="per-task and overall scores of a results file")
  s.add_argument("results", help="results.jsonl from `evaluate` (or GenEval's evaluator)")
  s.set_defaults(fn=_cmd_summary)
  return p


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  return errors.run_cli(args.fn, args, expected=(ImportError, NotImplementedError))  # expected: one line, exit 2
