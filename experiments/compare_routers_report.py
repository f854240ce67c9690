"""The report of experiments/compare_routers.py: paired differences over seeds, the table, the JSON lines, the figure.

Reads the finished cells (OUT/cells/*.json, one per variant and seed) and writes
compare_routers.{jsonl,md,png} into OUT and the docs folder. Every comparison is
paired by seed (the same seed is the same initial weights where shapes agree, the same
data order and the same held-out set): for a pairing A vs B and a metric, the
differences A - B over the seeds both finished give a mean and a 95% t-interval; a
difference is called (better or worse) only when the interval excludes zero.
"""

from __future__ import annotations

import glob
import json
import math
import os
import statistics

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats

PAIRINGS = (("ec", "dense"), ("ec", "tc"), ("ec", "tc_cap2"), ("ec_batch", "ec"), ("ec", "dit_moe"))
CAPACITY_PAIRINGS = (("ec_cf1", "ec_cf2"), ("ec_cf4", "ec_cf2"))
# metric key, label, lower is better
METRICS = (("heldout_equal_steps", "held-out loss @ equal steps", True),
           ("heldout_equal_wall_clock", "held-out loss @ equal wall clock", True),
           ("score_equal_steps", "GenEval-style score @ equal steps", False),
           ("score_equal_wall_clock", "GenEval-style score @ equal wall clock", False))
STEM = "compare_routers"


def heldout_curve(workdir: str) -> list[list[float]]:
  """[[step, held-out loss (EMA), held-out loss (params)], ...] from metrics.jsonl (last row of a step wins)."""
  rows = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if "heldout/loss_ema" in row:
        rows[row["step"]] = [row["step"], row["heldout/loss_ema"], row["heldout/loss"]]
  return [rows[s] for s in sorted(rows)]


def checkpoint_steps(workdir: str) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(p) for p in os.listdir(d) if p.isdigit()) if os.path.isdir(d) else []


def load_cells(out: str) -> list[dict]:
  cells = []
  for path in sorted(glob.glob(os.path.join(out, "cells", "*.json"))):
    with open(path) as f:
      cells.append(json.load(f))
  return cells


def _at_wall_clock(cell: dict, seconds: float) -> float:
  curve = np.array(cell["heldout"])
  return float(np.interp(seconds, curve[:, 0] * cell["seconds_per_step"], curve[:, 1]))


def metrics_of(cell: dict) -> dict:
  """The cell's values of METRICS (held-out: EMA weights; at equal wall clock interpolated between evaluations)."""
  out = {"heldout_equal_steps": cell["heldout"][-1][1]}
  if "wall_clock_budget_seconds" in cell:
    out["heldout_equal_wall_clock"] = _at_wall_clock(cell, cell["wall_clock_budget_seconds"])
    out["score_equal_steps"] = cell["score_equal_steps"]
    out["score_equal_wall_clock"] = cell["score_equal_wall_clock"]
  return out


def json_lines(cells: list[dict]) -> list[dict]:
  """One line per run and held-out evaluation, and one per score (equal steps; equal wall clock)."""
  lines = []
  for c in cells:
    base = dict(study=c["study"], variant=c["variant"], seed=c["seed"], steps=c["steps"],
                seconds_per_step=c["seconds_per_step"])
    for step, ema, params in c["heldout"]:
      lines.append(dict(base, kind="heldout", step=step, heldout_loss_ema=ema, heldout_loss=params,
                        wall_clock_seconds=step * c["seconds_per_step"]))
    if "score_equal_steps" in c:
      m = metrics_of(c)
      lines.append(dict(base, kind="score", budget="equal_steps", step=c["steps"], score=c["score_equal_steps"],
                        heldout_loss_ema=m["heldout_equal_steps"], wall_clock_seconds=c["steps"] * c["seconds_per_step"]))
      lines.append(dict(base, kind="score", budget="equal_wall_clock", step=c["step_at_budget"],
                        score=c["score_equal_wall_clock"], heldout_loss_ema=m["heldout_equal_wall_clock"],
                        wall_clock_seconds=c["wall_clock_budget_seconds"]))
  return lines


def interval(diffs: list[float]) -> tuple[float, float, float]:
  """(mean, low, high): the 95% t-interval of the mean difference (nan bounds for one seed)."""
  mean = statistics.fmean(diffs)
  if len(diffs) < 2:
    return mean, math.nan, math.nan
  half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
  return mean, mean - half, mean + half


def verdict(low: float, high: float, lower_is_better: bool) -> str:
  if math.isnan(low) or low <= 0 <= high:
    return "not resolved"
  a_lower = high < 0
  return "better" if a_lower == lower_is_better else "worse"


def paired(cells: list[dict], a: str, b: str, key: str):
  """Seeds both finished, and the differences A - B of `key` over them."""
  by = {(c["variant"], c["seed"]): metrics_of(c) for c in cells}
  seeds = sorted(s for v, s in by if v == a and (b, s) in by and by[(a, s)].get(key) is not None
                 and by[(b, s)].get(key) is not None)
  return seeds, [by[(a, s)][key] - by[(b, s)][key] for s in seeds]


def comparisons(cells, pairings, metrics) -> list[dict]:
  rows = []
  for a, b in pairings:
    for key, label, lower in metrics:
      seeds, diffs = paired(cells, a, b, key)
      if not seeds:
        continue
      mean, low, high = interval(diffs)
      rows.append(dict(a=a, b=b, metric=key, label=label, seeds=seeds, mean=mean, low=low, high=high,
                       verdict=verdict(low, high, lower)))
  return rows


def _num(x, scale=1.0, digits=4):
  return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{scale * x:.{digits}f}"


def _variant_rows(cells, study):
  out = []
  for v in dict.fromkeys(c["variant"] for c in cells if c["study"] == study):
    cs = [c for c in cells if c["variant"] == v and c["study"] == study]
    ms = [metrics_of(c) for c in cs]

    def mean_sd(key, scale=1.0, digits=4):
      vals = [m[key] for m in ms if m.get(key) is not None]
      if not vals:
        return "-"
      mean = f"{scale * statistics.fmean(vals):.{digits}f}"
      return f"{mean} ± {scale * statistics.stdev(vals):.{digits}f}" if len(vals) > 1 else mean  # no sd of one
    out.append(f"| {v} | {','.join(str(c['seed']) for c in cs)} | {cs[0]['steps']} | "
               f"{1 / cs[0]['seconds_per_step']:.2f} | {mean_sd('heldout_equal_steps')} | "
               + (f"{mean_sd('heldout_equal_wall_clock')} | {mean_sd('score_equal_steps', 100, 1)} | "
                  f"{mean_sd('score_equal_wall_clock', 100, 1)} |" if study == "routers" else ""))
  return out


def _comparison_lines(rows):
  lines = ["| A vs B | metric | seeds | mean A - B | 95% interval | A is |", "|---|---|---|---|---|---|"]
  for r in rows:
    score = r["metric"].startswith("score")
    scale, digits = (100.0, 1) if score else (1.0, 4)
    lines.append(f"| {r['a']} vs {r['b']} | {r['label']} | {len(r['seeds'])} | {_num(r['mean'], scale, digits)} | "
                 f"[{_num(r['low'], scale, digits)}, {_num(r['high'], scale, digits)}] | {r['verdict']} |")
  return lines


README_PAIRINGS = (("ec", "dense", "EC vs dense"), ("ec", "tc", "EC vs token choice (dropless)"),
                   ("ec", "tc_cap2", "EC vs token choice (capacity 2)"),
                   ("ec_batch", "ec", "EC with batch groups vs per-image groups"))
README_START, README_END = "<!-- router_verdicts:start -->", "<!-- router_verdicts:end -->"


def readme_table(cells: list[dict], seeds_wanted: int = 3) -> str:
  """The README's verdict per pairing: A - B, mean over seeds with its 95% interval, for the held-out loss at
  equal steps and equal wall clock and the GenEval-style score; a verdict per metric."""
  routers = [c for c in cells if c["study"] == "routers"]
  lines = ["| pairing (A vs B) | seeds | held-out loss A - B, equal steps | equal wall clock | "
           "GenEval-style A - B (points) |", "|---|---|---|---|---|"]
  for a, b, label in README_PAIRINGS:
    rows = {r["metric"]: r for r in comparisons(routers, [(a, b)], (METRICS[0], METRICS[1], METRICS[2]))}
    if not rows:
      lines.append(f"| {label} | 0 of {seeds_wanted} | no seed finished yet | | |")
      continue
    cellsof = []
    for key in ("heldout_equal_steps", "heldout_equal_wall_clock", "score_equal_steps"):
      r = rows[key]
      scale, digits = (100.0, 1) if key.startswith("score") else (1.0, 5)
      ci = "" if math.isnan(r["low"]) else f" [{_num(r['low'], scale, digits)}, {_num(r['high'], scale, digits)}]"
      cellsof.append(f"{'+' if r['mean'] >= 0 else ''}{_num(r['mean'], scale, digits)}{ci}: "
                     f"**{'A ' + r['verdict'] if r['verdict'] != 'not resolved' else 'not resolved'}**")
    n = len(rows["heldout_equal_steps"]["seeds"])
    lines.append(f"| {label} | {n} of {seeds_wanted} | " + " | ".join(cellsof) + " |")
  return "\n".join(lines) + "\n"


def replace_readme_table(path: str, cells: list[dict]) -> None:
  """Rewrites the part of `path` between README_START and README_END with `readme_table`."""
  with open(path) as f:
    text = f.read()
  if README_START not in text or README_END not in text:
    raise SystemExit(f"{path}: no {README_START} ... {README_END} section to replace")
  head, rest = text.split(README_START, 1)
  new = head + README_START + "\n" + readme_table(cells) + README_END + rest.split(README_END, 1)[1]
  with open(path, "w") as f:
    f.write(new)


def markdown(cells: list[dict]) -> str:
  routers = [c for c in cells if c["study"] == "routers"]
  capacity = [c for c in cells if c["study"] == "capacity"]
  w = next((c["wall_clock_budget_seconds"] for c in routers), None)
  lines = [f"Finished cells: {len(cells)} ({len(routers)} router runs, {len(capacity)} capacity-factor runs). "
           "Tiny ShapesWorld default (configs/ec_dit_tiny.py), its full step budget; held-out loss: 256 held-out "
           "examples x 5 fixed t, fixed noise, EMA weights (mean ± sd over seeds); GenEval-style score in % "
           f"(per seed: 25 prompts per task, 4 images each). Equal wall clock W = {_num(w, 1, 0)} s at the "
           "interleaved step times (steps/s).", "",
           "| variant | seeds | steps | steps/s | held-out @ equal steps | held-out @ W | score @ equal steps | "
           "score @ W |", "|---|---|---|---|---|---|---|---|", *_variant_rows(cells, "routers"), "",
           "Paired by seed; a difference is called only when its 95% t-interval excludes zero "
           "(held-out loss: lower is better; score: higher is better).", "",
           *_comparison_lines(comparisons(routers, PAIRINGS, METRICS))]
  if capacity:
    lines += ["", "Capacity factor (expert choice, half the step budget):", "",
              "| variant | seeds | steps | steps/s | held-out @ equal steps |", "|---|---|---|---|---|",
              *_variant_rows(cells, "capacity"), "",
              *_comparison_lines(comparisons(capacity, CAPACITY_PAIRINGS, METRICS[:1]))]
  return "\n".join(lines) + "\n"


def _curves(ax, cells, wall_clock: bool):
  for i, v in enumerate(dict.fromkeys(c["variant"] for c in cells)):
    cs = [np.array(c["heldout"]) for c in cells if c["variant"] == v]
    n = min(len(c) for c in cs)
    steps = cs[0][:n, 0]
    y = np.stack([c[:n, 1] for c in cs])
    x = steps * next(c["seconds_per_step"] for c in cells if c["variant"] == v) if wall_clock else steps
    ax.plot(x, y.mean(0), color=f"C{i}", label=f"{v} ({len(cs)} seed{'s' if len(cs) > 1 else ''})")
    ax.fill_between(x, y.min(0), y.max(0), color=f"C{i}", alpha=0.2)
  ax.set_yscale("log")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)


def _differences(ax, cells, reference: str):
  """Each variant's held-out loss minus the reference's of the same seed, against steps: mean over seeds, band
  min..max. The curves of the first panels differ by less than their line width; this is where they part."""
  ref = {c["seed"]: np.array(c["heldout"]) for c in cells if c["variant"] == reference}
  for i, v in enumerate(dict.fromkeys(c["variant"] for c in cells)):
    pairs = [(np.array(c["heldout"]), ref[c["seed"]]) for c in cells if c["variant"] == v and c["seed"] in ref]
    if v == reference or not pairs:
      continue
    n = min(min(len(a), len(b)) for a, b in pairs)
    d = np.stack([a[:n, 1] - b[:n, 1] for a, b in pairs])
    seeds = f"{len(pairs)} seed{'s' if len(pairs) > 1 else ''}"
    ax.plot(pairs[0][0][:n, 0], d.mean(0), color=f"C{i}", label=f"{v} - {reference} ({seeds})")
    ax.fill_between(pairs[0][0][:n, 0], d.min(0), d.max(0), color=f"C{i}", alpha=0.2)
  ax.axhline(0, color="k", linewidth=0.5)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_xlabel("training step")
  ax.set_ylabel(f"held-out loss minus {reference}'s, same seed")


def figure(cells: list[dict], path: str) -> None:
  routers = [c for c in cells if c["study"] == "routers"]
  capacity = [c for c in cells if c["study"] == "capacity"]
  fig = Figure(figsize=(20, 4), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, 4)
  axes[1].sharey(axes[0])
  axes[3].sharey(axes[0])
  if routers:
    _curves(axes[0], routers, False)
    _curves(axes[1], routers, True)
    axes[1].axvline(routers[0]["wall_clock_budget_seconds"], color="k", linestyle=":", linewidth=1)
    _differences(axes[2], routers, "dense")
  if capacity:
    _curves(axes[3], capacity, False)
  else:
    axes[3].text(0.5, 0.5, "capacity study: no finished cell yet", ha="center", transform=axes[3].transAxes)
  axes[0].set_ylabel("held-out loss (EMA weights)")
  axes[0].set_xlabel("training step")
  axes[1].set_xlabel("wall clock (s): steps x interleaved step time; dotted: W")
  axes[3].set_xlabel("training step (capacity factor, half budget)")
  fig.suptitle("Router comparison, tiny ShapesWorld: held-out loss (mean over seeds, band = min..max)", fontsize=10)
  fig.savefig(path, dpi=110, format="png")


def write(out: str, docs: str | None, readme: str | None = None) -> list[dict]:
  """Rewrites compare_routers.{jsonl,md,png} in `out` (and `docs`) from the finished cells, and with `readme`
  that file's verdict table; returns the cells."""
  cells = load_cells(out)
  if not cells:
    return cells
  if readme:
    replace_readme_table(readme, cells)
  for folder in dict.fromkeys(f for f in (out, docs) if f):
    os.makedirs(folder, exist_ok=True)
    stem = os.path.join(folder, STEM)
    tmp = f".{os.getpid()}.tmp"  # two study processes may rewrite OUT's report at once
    with open(stem + ".jsonl" + tmp, "w") as f:
      f.writelines(json.dumps(line) + "\n" for line in json_lines(cells))
    os.replace(stem + ".jsonl" + tmp, stem + ".jsonl")
    with open(stem + ".md" + tmp, "w") as f:
      f.write(markdown(cells))
    os.replace(stem + ".md" + tmp, stem + ".md")
    figure(cells, stem + ".png" + tmp)
    os.replace(stem + ".png" + tmp, stem + ".png")
  return cells
