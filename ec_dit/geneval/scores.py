"""GenEval score summary: per-task accuracy, overall (mean of tasks), image/prompt rates."""
from __future__ import annotations

import json
from typing import Sequence

from ec_dit.vocabulary import TASKS


def read_results(path: str) -> list[dict]:
  """Rows of a ``results.jsonl`` (ours or the official evaluator's); a bad line raises ValueError naming
  the file and line number."""
  rows = []
  with open(path, "rb") as f:
    for n, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
        if not line.strip():
          continue
        row = json.loads(line)
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}:{n}: not a JSON line ({e})") from None
      missing = [k for k in ("tag", "correct", "metadata") if not isinstance(row, dict) or k not in row]
      if missing:
        raise ValueError(f"{path}:{n}: a result row needs the fields 'tag', 'correct' and 'metadata'; "
                         f"missing {missing}")
      rows.append(row)
  return rows


def summarize(rows: Sequence[dict] | str) -> dict:
  """Scores of evaluated images.

  Returns a dict: one accuracy per task present (fraction of correct images),
  ``overall`` = unweighted mean over the tasks present (GenEval's score),
  ``images`` = fraction of correct images, ``prompts`` = fraction of prompts
  with at least one correct image (prompts grouped by their metadata), and
  ``counts`` = ``{task: [correct, total]}``.
  """
  if isinstance(rows, str):
    rows = read_results(rows)
  if not rows:
    raise ValueError("no results to summarise")
  per_task: dict[str, list[int]] = {}
  per_prompt: dict[str, bool] = {}
  for r in rows:
    c = per_task.setdefault(r["tag"], [0, 0])
    c[0] += bool(r["correct"])
    c[1] += 1
    per_prompt[r["metadata"]] = per_prompt.get(r["metadata"], False) or bool(r["correct"])
  order = [t for t in TASKS if t in per_task] + sorted(t for t in per_task if t not in TASKS)
  out = {"overall": sum(per_task[t][0] / per_task[t][1] for t in order) / len(order)}
  for t in order:
    out[t] = per_task[t][0] / per_task[t][1]
  out["images"] = sum(bool(r["correct"]) for r in rows) / len(rows)
  out["prompts"] = sum(per_prompt.values()) / len(per_prompt)
  out["counts"] = {t: per_task[t] for t in order}
  return out


def format_summary(s: dict) -> str:
  """A text table followed by one JSON line ``{"overall": ..., task: ...}``."""
  counts = s["counts"]
  n_img = sum(v[1] for v in counts.values())
  lines = [f"{'task':<16} {'accuracy':>9} {'correct':>8} {'total':>6}"]
  for t, (c, n) in counts.items():
    lines.append(f"{t:<16} {s[t]:>9.2%} {c:>8d} {n:>6d}")
  lines.append(f"{'overall':<16} {s['overall']:>9.2%}   (mean of {len(counts)} tasks)")
  lines.append(f"{'images':<16} {s['images']:>9.2%}   ({n_img} images)")
  lines.append(f"{'prompts':<16} {s['prompts']:>9.2%}   (any sample correct)")
  js = {"overall": round(s["overall"], 6)}
  js.update({t: round(s[t], 6) for t in counts})
  js.update(images=round(s["images"], 6), prompts=round(s["prompts"], 6))
  lines.append(json.dumps(js))
  return "\n".join(lines)


