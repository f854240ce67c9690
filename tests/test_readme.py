"""The README's Python blocks run as written (issue 30): extracted as doctest would, executed from a copy of
the repository root's layout (configs/), and their results checked against what the comments claim."""

import math
import os
import re

import jax
from PIL import Image

from helpers import REPO


def python_blocks(text: str) -> list[str]:
  """The ```python fenced blocks of a Markdown text, in order."""
  return re.findall(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)


def test_python_blocks_are_found():
  assert python_blocks("a\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = 2\n```\n") == ["x = 1\n",
                                                                                                  "y = 2\n"]


def test_readme_python_blocks_run_as_written(tmp_path, monkeypatch):
  blocks = python_blocks((REPO / "README.md").read_text())
  assert blocks, "the README has no ```python block"
  os.symlink(REPO / "configs", tmp_path / "configs")  # the commands run from the repository root
  monkeypatch.chdir(tmp_path)
  namespace: dict = {}
  for block in blocks:
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README is this repository's
  # what the comments say
  assert namespace["capacity"] == 16 and namespace["token_indices"].shape == (1, 8, 16)
  assert namespace["expert_indices"].shape == (1, 64, 2)
  n = sum(math.prod(x.shape) for x in jax.tree.leaves(namespace["model"]))
  assert round(n / 1e6, 1) == 5.1, n
  assert namespace["velocity"].shape == namespace["x_t"].shape
  images = namespace["out"].images
  assert len(images) == 2 and all(isinstance(im, Image.Image) and im.size == (32, 32) for im in images)
  assert (tmp_path / "runs" / "api" / "red_circle.png").is_file()
