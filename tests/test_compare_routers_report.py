"""The router study's statistics (experiments/compare_routers_report.py): differences paired by seed, their 95%
t-interval, a verdict only when the interval excludes zero, and the README table written from the cells."""

import json
import math
import sys

import numpy as np
import pytest
from scipy import stats

from helpers import REPO

sys.path.insert(0, str(REPO / "experiments"))
import compare_routers_report as report  # noqa: E402


def _cell(variant, seed, final, score=0.5, seconds_per_step=0.3):
  curve = [[250, final + 0.01, final + 0.011], [500, final, final + 0.001]]
  return dict(study="routers", variant=variant, seed=seed, steps=500, heldout=curve, seconds_per_step=seconds_per_step,
              wall_clock_budget_seconds=500 * 0.3, step_at_budget=500, score_equal_steps=score,
              score_equal_wall_clock=score)


def test_interval_is_the_t_interval_of_the_paired_differences():
  diffs = [0.001, 0.003, 0.002]
  mean, low, high = report.interval(diffs)
  sem = np.std(diffs, ddof=1) / math.sqrt(3)
  assert mean == pytest.approx(0.002)
  assert (low, high) == pytest.approx(stats.t.interval(0.95, 2, loc=0.002, scale=sem))
  assert math.isnan(report.interval([0.1])[1])  # one seed: no interval


def test_a_difference_is_called_only_when_its_interval_excludes_zero():
  assert report.verdict(-0.3, -0.1, lower_is_better=True) == "better"
  assert report.verdict(-0.3, -0.1, lower_is_better=False) == "worse"
  assert report.verdict(0.1, 0.3, lower_is_better=True) == "worse"
  assert report.verdict(-0.1, 0.3, lower_is_better=True) == "not resolved"
  assert report.verdict(math.nan, math.nan, lower_is_better=True) == "not resolved"


def test_pairs_are_matched_by_seed_and_unpaired_seeds_are_left_out():
  cells = [_cell("ec", 0, 0.030), _cell("ec", 1, 0.031), _cell("ec", 2, 0.032),
           _cell("dense", 0, 0.031), _cell("dense", 2, 0.034)]  # dense seed 1 not finished
  seeds, diffs = report.paired(cells, "ec", "dense", "heldout_equal_steps")
  assert seeds == [0, 2] and diffs == pytest.approx([-0.001, -0.002])


def test_readme_table_states_each_pairing_with_its_interval(tmp_path):
  # EC lower than dense by 0.001-0.0012 in all three seeds: "A better"; batch groups vs per-image: mixed signs
  cells = [_cell("ec", s, 0.030 + 0.001 * s) for s in range(3)]
  cells += [_cell("dense", s, 0.031 + 0.001 * s + 0.0001 * s) for s in range(3)]
  cells += [_cell("ec_batch", s, 0.030 + 0.001 * s + (-1) ** s * 0.0005) for s in range(3)]
  readme = tmp_path / "README.md"
  readme.write_text(f"before\n{report.README_START}\nold\n{report.README_END}\nafter\n")
  report.replace_readme_table(str(readme), cells)
  text = readme.read_text()
  assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
  rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| EC")}
  low, high = report.interval([-0.001, -0.0011, -0.0012])[1:]
  assert "3 of 3" in rows["EC vs dense"] and "**A better**" in rows["EC vs dense"]
  assert f"[{low:.5f}, {high:.5f}]" in rows["EC vs dense"]
  assert "**not resolved**" in rows["EC with batch groups vs per-image groups"]
  assert "no seed finished yet" in rows["EC vs token choice (dropless)"]
  json.dumps(report.json_lines(cells))  # the JSON lines of these cells serialise
