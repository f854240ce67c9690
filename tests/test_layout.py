"""The package's shape: imports point one way, no hidden imports, small modules.

Reads every module under `ec_dit/` as source (nothing is imported), builds the
graph of its imports of other `ec_dit` modules, and checks:

* no import cycle between modules;
* no function-local import of an `ec_dit` module (a local import is how a cycle
  hides), except the allow-listed ones below, each with its reason;
* the layering the README describes: the config schema imports nothing else from
  `ec_dit`; model code never imports training, data or evaluation; sharding never
  builds a model; data never imports evaluation;
* no module over 350 lines.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "ec_dit"
MAX_LINES = 350

# (importing module, imported module): why the import stays inside a function.
LOCAL_IMPORTS_ALLOWED = {
    ("ec_dit.data.sources", "ec_dit.data.shapes_world_tfds"):
        "registers the TFDS builder; it imports tensorflow_datasets (seconds), so only tfds: sources pay it",
}

# Layers: modules under the prefix on the left may not import modules under any prefix on the right.
# `ec_dit.errors` (the project's error classes, importing nothing) is below every layer: all may import it.
BOTTOM = "ec_dit.errors"
FORBIDDEN = {
    "ec_dit.errors": ("ec_dit.",),
    "ec_dit.schema": ("ec_dit.",),  # the bottom: nothing else from ec_dit (its own package is exempt below)
    "ec_dit.vocabulary": ("ec_dit.data", "ec_dit.geneval", "ec_dit.model", "ec_dit.training"),
    "ec_dit.primitives": ("ec_dit.model", "ec_dit.moe", "ec_dit.training", "ec_dit.data", "ec_dit.geneval"),
    "ec_dit.sharding": ("ec_dit.model", "ec_dit.moe", "ec_dit.training", "ec_dit.data", "ec_dit.geneval"),
    "ec_dit.moe": ("ec_dit.model", "ec_dit.training", "ec_dit.data", "ec_dit.geneval", "ec_dit.inference",
                   "ec_dit.checkpoint", "ec_dit.diffusion"),
    "ec_dit.model": ("ec_dit.training", "ec_dit.data", "ec_dit.geneval", "ec_dit.inference", "ec_dit.checkpoint",
                     "ec_dit.diffusion", "ec_dit.tools", "ec_dit.diffusion.ddpm", "ec_dit.diffusion.class_labels", "ec_dit.convert"),
    "ec_dit.diffusion": ("ec_dit.training", "ec_dit.data", "ec_dit.geneval", "ec_dit.inference"),
    "ec_dit.data": ("ec_dit.geneval", "ec_dit.training", "ec_dit.model", "ec_dit.inference"),
    "ec_dit.checkpoint": ("ec_dit.training", "ec_dit.geneval", "ec_dit.inference"),
    "ec_dit.inference": ("ec_dit.training", "ec_dit.geneval"),
    # DiT-MoE (issue 19): the unpickler and DDPM math stand alone; losses and samplers take any model.
    "ec_dit.convert.torch_pickle": ("ec_dit.",),
    "ec_dit.diffusion.ddpm": ("ec_dit.",),
    "ec_dit.diffusion.class_labels": ("ec_dit.model", "ec_dit.training", "ec_dit.data", "ec_dit.geneval",
                               "ec_dit.inference", "ec_dit.checkpoint"),
}


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str) -> str | None:
  """The ec_dit module (or package) an import name refers to, or None outside ec_dit."""
  while name:
    if name in MODULES:
      return name
    name = name.rpartition(".")[0]
  return None


def _imports(module: str):
  """(target module, is_module_level, line) for each import of an ec_dit module in `module`."""
  tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
  top_level = {id(node) for node in tree.body}
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names = [f"{node.module}.{a.name}" for a in node.names]
    for name in names:
      target = _resolve(name)
      if target and target != "ec_dit" and target != module:
        yield target, id(node) in top_level, node.lineno


def _ancestors(module: str) -> set[str]:
  parts = module.split(".")
  return {".".join(parts[:i]) for i in range(1, len(parts))}


def _graph() -> dict[str, set[str]]:
  """Module-level import edges; importing a.b.c also runs the __init__ of a.b (unless the importer is inside a.b)."""
  graph = {}
  for module in MODULES:
    edges = set()
    for target, top, _ in _imports(module):
      if not top:
        continue
      edges.add(target)
      edges.update(p for p in _ancestors(target) if p in MODULES and p != "ec_dit"
                   and p not in _ancestors(module) and p != module)
    graph[module] = edges - {module} - _ancestors(module)
  return graph


def test_the_import_graph_has_no_cycle():
  graph = _graph()
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(m):
    state[m] = 1
    stack.append(m)
    for n in sorted(graph[m]):
      if state.get(n) == 1:
        cycle = stack[stack.index(n):] + [n]
        pytest.fail("import cycle: " + " -> ".join(cycle))
      if n not in state:
        visit(n)
    stack.pop()
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m)


def test_no_function_local_imports_of_ec_dit_modules():
  found = []
  for module in MODULES:
    for target, top, line in _imports(module):
      if not top and (module, target) not in LOCAL_IMPORTS_ALLOWED:
        found.append(f"{MODULES[module].relative_to(PACKAGE.parent)}:{line} imports {target} inside a function")
  assert not found, "\n".join(found)


def test_allow_list_entries_are_still_needed():
  local = {(m, t) for m in MODULES for t, top, _ in _imports(m) if not top}
  assert set(LOCAL_IMPORTS_ALLOWED) <= local, set(LOCAL_IMPORTS_ALLOWED) - local


def test_layers_point_downward():
  bad = []
  for module in MODULES:
    for prefix, forbidden in FORBIDDEN.items():
      if module != prefix and not module.startswith(prefix + "."):
        continue
      for target, _, line in _imports(module):
        if target == prefix or target.startswith(prefix + ".") or target == BOTTOM:
          continue  # within its own package, or the error classes every layer may raise
        if any(target == f or target.startswith(f.rstrip(".") + ".") or (f.endswith(".") and target.startswith(f))
               for f in forbidden):
          bad.append(f"{module}:{line} imports {target}")
  assert not bad, "\n".join(bad)


def test_the_graph_sees_real_edges():
  """Guards the checker itself: known edges must be found, so an empty graph cannot pass silently."""
  graph = _graph()
  assert "ec_dit.model.dit" in graph["ec_dit.model.text_to_image"]
  assert "ec_dit.schema" in graph["ec_dit.sharding"]
  assert "ec_dit.moe.layers" in graph["ec_dit.model.dit"]
  assert "ec_dit.moe" in graph["ec_dit.model.dit"]  # a package's __init__ runs when a submodule is imported


# Training drives no sampling pipeline, figure or evaluation: `ec_dit.evaluators` builds those jobs (sample grids,
# routing maps, GenEval) and passes them into the loop as callables.
NOT_IMPORTED_BY_TRAINING = ("ec_dit.inference", "ec_dit.inference.class_to_image", "ec_dit.routing_maps", "ec_dit.routing_maps.trace",
                            "ec_dit.geneval")


def _sampling_or_evaluation_imports(module: str) -> list[str]:
  return [f"{module}:{line} imports {target}" for target, _, line in _imports(module)
          if any(target == name or target.startswith(name + ".") for name in NOT_IMPORTED_BY_TRAINING)]


def test_training_imports_no_sampling_pipeline_routing_maps_or_geneval():
  training = [m for m in MODULES if m == "ec_dit.training" or m.startswith("ec_dit.training.")]
  assert "ec_dit.training.loop" in training
  bad = [line for m in training for line in _sampling_or_evaluation_imports(m)]
  assert not bad, "\n".join(bad)
  # the check sees such imports where they belong: the evaluators hand them to the loop
  assert len(_sampling_or_evaluation_imports("ec_dit.evaluators")) >= 3


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_small(module):
  lines = len(MODULES[module].read_text().splitlines())
  assert lines <= MAX_LINES, f"{MODULES[module]} has {lines} lines (at most {MAX_LINES})"


# The one module that may test the model family by its name: the task registry (the map from `config.model.arch`
# to a task). Checks that depend on the family are the task's (`Task.validate`), not the schema's.
ARCH_TESTS_ALLOWED = {"ec_dit.tasks": "the registry"}
MODEL_NAMES = {"model", "m", "model_config", "model_lib"}


def _arch_tests(module: str):
  """(line, what) of each read of `.arch` on a model config (`model.arch`, `config.model.arch`, `m.arch`),
  each `.get("arch", ...)` on one, and each call of an `is_class_cond` function."""
  tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute) and node.attr == "arch" and isinstance(node.ctx, ast.Load):
      owner = node.value
      if (isinstance(owner, ast.Name) and owner.id in MODEL_NAMES) or (
          isinstance(owner, ast.Attribute) and owner.attr == "model"):
        yield node.lineno, ast.unparse(node)
    elif isinstance(node, ast.Call):
      fn = node.func
      name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
      if name == "is_class_cond":
        yield node.lineno, ast.unparse(node)
      elif (name == "get" and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value == "arch"
            and isinstance(fn, ast.Attribute)):
        yield node.lineno, ast.unparse(node)


def test_only_the_task_registry_tests_the_model_arch():
  bad = [f"{MODULES[m].relative_to(PACKAGE.parent)}:{line}: {what} (ask ec_dit.tasks.task_for(config) instead)"
         for m in MODULES if m not in ARCH_TESTS_ALLOWED for line, what in _arch_tests(m)]
  assert not bad, "\n".join(bad)


def test_the_arch_check_sees_real_tests():
  """Guards the checker itself: the registry's own read of the arch is found."""
  assert list(_arch_tests("ec_dit.tasks"))
  assert set(ARCH_TESTS_ALLOWED) <= set(MODULES)
