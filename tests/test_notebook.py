"""notebooks/quickstart.ipynb runs top to bottom (with a few steps) and is stored without outputs."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

from helpers import REPO

NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


def _notebook():
  return nbformat.read(NOTEBOOK, as_version=4)


def test_notebook_outputs_are_stripped():
  for cell in _notebook().cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


@pytest.mark.slow
def test_notebook_executes_with_a_few_steps(tmp_path):
  nb = _notebook()
  params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(params) == 1, "the notebook has exactly one parameter cell (tagged 'parameters')"
  params[0].source = f'TRAIN_STEPS = 4\nFAST = True\nWORKDIR = {str(tmp_path / "run")!r}\n'
  # One CPU device, like a Colab CPU runtime (the test session forces 8 host devices).
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}})
  client.execute(env=env)  # raises CellExecutionError naming the cell if any cell fails
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) >= 5  # loss curve, samples, routing maps, compute spread, specialisation
  assert (tmp_path / "run" / "geneval" / "summary.json").exists()


def test_executed_copy_in_docs_has_pictures_and_the_notebooks_code():
  """docs/quickstart_executed.ipynb (notebooks/execute_copy.py) shows outputs without running anything, and is
  the stripped notebook's code: regenerate it when the notebook changes."""
  executed = nbformat.read(REPO / "docs" / "quickstart_executed.ipynb", as_version=4)
  assert [c.source for c in executed.cells] == [c.source for c in _notebook().cells]
  images = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
  assert len(images) >= 5
