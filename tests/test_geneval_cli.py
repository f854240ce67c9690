"""CLI end to end, prompt-file validation and the official GenEval prompt file."""
import json
import os

import pytest

from ec_dit import configs
from ec_dit.geneval import prompts
from ec_dit.geneval.cli import main
from helpers import REPO

OFFICIAL = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "geneval", "evaluation_metadata.jsonl")


def test_cli_prompts_render_validate_evaluate_summary(tmp_path, capsys):
  pf, img, res = str(tmp_path / "p.jsonl"), str(tmp_path / "img"), str(tmp_path / "r.jsonl")
  assert main(["prompts", "--domain", "shapes", "--out", pf, "--per-task", "6"]) == 0
  ps = prompts.load_prompts(pf)
  assert set(prompts.count_tasks(ps)) == set(prompts.TASKS) and all(prompts.count_tasks(ps).values())
  assert main(["render", "--prompts", pf, "--out", img, "--n", "2", "--size", "32", "--quiet"]) == 0
  assert os.path.isfile(os.path.join(img, "00000", "samples", "0001.png"))
  assert os.path.isfile(os.path.join(img, "00000", "grid.png")) and os.path.isfile(os.path.join(img, "grid.png"))
  with open(os.path.join(img, "00003", "metadata.jsonl")) as f:
    assert json.loads(f.read()) == ps[3]
  assert main(["validate", "--prompts", pf, "--images", img, "--n", "2"]) == 0
  capsys.readouterr()
  assert main(["evaluate", "--images", img, "--out", res, "--quiet"]) == 0
  with open(res) as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == 2 * len(ps)
  r = rows[0]
  assert set(r) == {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"}
  assert json.loads(r["metadata"]) == ps[0] and r["correct"] is True and r["reason"] == ""
  det = json.loads(r["details"])
  cls = ps[0]["include"][0]["class"]
  assert len(det[cls]) == 1 and len(det[cls][0]) == 5 and det[cls][0][4] == 1.0
  capsys.readouterr()
  assert main(["summary", res]) == 0
  out = capsys.readouterr().out.strip().splitlines()
  js = json.loads(out[-1])
  assert js["overall"] == 1.0 and set(prompts.TASKS) <= set(js)
  assert out[0].split()[0] == "task"


def test_validate_names_missing_samples(tmp_path, capsys):
  pf, img = str(tmp_path / "p.jsonl"), str(tmp_path / "img")
  prompts.write_prompts(prompts.generate_suite(prompts.DOMAINS["shapes"], 0, 2)[:3], pf)
  assert main(["render", "--prompts", pf, "--out", img, "--n", "2", "--quiet"]) == 0
  os.remove(os.path.join(img, "00001", "samples", "0001.png"))
  os.remove(os.path.join(img, "00002", "metadata.jsonl"))
  capsys.readouterr()
  assert main(["validate", "--prompts", pf, "--images", img, "--n", "2"]) == 1
  out = capsys.readouterr().out
  assert "00001/samples: missing 0001.png" in out and "00002: missing metadata.jsonl" in out


@pytest.mark.parametrize("line,msg", [
    ('{"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "teal"}], "prompt": "x"}', "include[0].color"),
    ('{"tag": "counting", "include": [{"class": "circle", "count": "2"}], "prompt": "x"}', "include[0].count"),
    ('{"tag": "oops", "include": [{"class": "circle", "count": 1}], "prompt": "x"}', "'tag'"),
    ('{"tag": "position", "include": [{"class": "a", "count": 1, "position": ["near", 0]}], "prompt": "x"}', "position[0]"),
    ('{"tag": "single_object", "include": [], "prompt": "x"', "invalid JSON"),
])
def test_bad_prompt_lines_report_line_and_field(tmp_path, capsys, line, msg):
  pf = tmp_path / "bad.jsonl"
  good = '{"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"}'
  pf.write_text(good + "\n\n" + line + "\n")
  assert main(["validate", "--prompts", str(pf)]) == 2
  err = capsys.readouterr().err
  assert f"{pf}:3:" in err and msg in err


def test_render_rejects_non_shapes_prompts(tmp_path, capsys):
  pf = tmp_path / "coco.jsonl"
  prompts.write_prompts([{"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}], str(pf))
  assert main(["render", "--prompts", str(pf), "--out", str(tmp_path / "o"), "--quiet"]) == 2
  assert "prompt 0" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.isfile(OFFICIAL), reason="official GenEval prompt file not present")
def test_official_prompt_file_validates_and_is_reproduced(capsys):
  ps = prompts.load_prompts(OFFICIAL)
  assert prompts.count_tasks(ps) == {"single_object": 80, "two_object": 99, "counting": 80,
                                     "colors": 94, "position": 100, "color_attr": 100}
  assert main(["validate", "--prompts", OFFICIAL]) == 0
  assert "553 prompts" in capsys.readouterr().out
  # Our COCO-domain generator replays GenEval's create_prompts.py exactly.
  with open(OFFICIAL) as f:
    lines = [line.rstrip("\n") for line in f if line.strip()]
  assert [json.dumps(p) for p in prompts.generate_suite(prompts.COCO_CLASSES, 43, 100)] == lines


def test_help_lists_commands(capsys):
  with pytest.raises(SystemExit):
    main(["--help"])
  out = capsys.readouterr().out
  for cmd in ("prompts", "validate", "render", "evaluate", "summary"):
    assert cmd in out


def test_the_readme_prompt_command_writes_what_the_default_run_scores(tmp_path):
  """README: `geneval prompts --domain shapes --seed 0 --per-task 100` = the tiny run's geneval/prompts.jsonl."""
  readme = (REPO / "README.md").read_text()
  assert "geneval prompts  --domain shapes --seed 0 --per-task 100 --out prompts.jsonl" in readme
  out = tmp_path / "prompts.jsonl"
  assert main(["prompts", "--domain", "shapes", "--seed", "0", "--per-task", "100", "--out", str(out)]) == 0
  suite = prompts.suite_from_config(configs.load(str(REPO / "configs" / "ec_dit_tiny.py")).geneval)
  assert out.read_text().splitlines() == [json.dumps(p) for p in suite] and len(suite) == 158
