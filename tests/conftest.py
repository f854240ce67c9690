"""Test set-up: 8 forced host devices so mesh tests run on a CPU, fast compiles, and one JAX compilation cache per run.

This must run before jax initialises its backends, which is why it lives here.

Fast compiles: the tests' programs are small and run for a few steps, so most of the suite's time is
XLA:CPU compiling them. `--xla_backend_optimization_level=0` skips LLVM's optimisation of the compiled
kernels (XLA's own graph passes still run, and matmuls still call the same library kernels): measured
on the tests' micro model, 30% less time for a 3-step run and still 10% less for 200 steps. Values can
differ from an optimised build in the last bits; every test compares programs built the same way, or
with a tolerance. Set XLA_FLAGS yourself to test with other flags.

The compilation cache: many tests build the same small programs again (every `loop.train` call
makes and compiles its train step anew, and the subprocesses that the CLI, signal and multi-host
tests start compile the same programs once more). JAX's persistent cache turns each repeat into a
read of the executable XLA compiled the first time. It is a fresh folder for each run of pytest
(shared by its xdist workers and every subprocess through the environment, removed at the end),
so nothing carries over from one run to the next; set JAX_COMPILATION_CACHE_DIR yourself to use
(and keep) another folder.
"""
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the first process of the run (xdist's controller) makes it
  _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ec_dit_test_jax_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_unconfigure(config):
  if _OWN_CACHE:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


# The slowest files, slowest first (wall time of each file alone, measured): the rest follow in their
# usual order. With `-n 2` (xdist, one file per work unit, `--dist loadfile` in pyproject.toml) the two
# workers start on the longest files, and the short ones fill in at the end, so both finish together.
SLOW_FILES = ("test_multihost.py", "test_latent_demo.py", "test_reliability.py", "test_train.py", "test_pixart_run.py",
              "test_tpu_compile.py", "test_sharding.py", "test_latent_path.py",
              "test_dit_moe_sharding.py", "test_text_and_sampling.py", "test_model.py", "test_dit_moe_training.py",
              "test_untrusted_files.py", "test_untrusted_data.py", "test_run_outputs.py",
              "test_readme.py", "test_moe_layers.py", "test_grouped.py", "test_routing_maps.py", "test_notebook.py",
              "test_heldout.py", "test_routing_trace.py")


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(SLOW_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))  # stable: order within a file is kept


def pytest_terminal_summary(terminalreporter):
  """Prints what tests recorded with `record_property("report", ...)` (e.g. how many mutations the unpickler
  fuzz test tried), also under xdist, where the tests' own output is not shown."""
  for report in terminalreporter.stats.get("passed", []) + terminalreporter.stats.get("failed", []):
    for name, value in getattr(report, "user_properties", []):
      if name == "report":
        terminalreporter.write_line(f"{report.nodeid}: {value}")
