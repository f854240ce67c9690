"""Issue 27 items 1-2: the DiT-MoE converter's unpickler treats a .pt file as data, never as code or memory.

Crafted pickles (tests/untrusted_pickles.py) reproduce the issue's attacks; the
fuzzer mutates the committed fixtures in a child process (a crash is its exit code).
"""

import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from ec_dit import errors
from ec_dit.convert import torch_pickle
from ec_dit.convert import __main__ as convert_cli
from dit_moe_fixtures import CHECKPOINT
from untrusted_pickles import BUILD, REDUCE, SETITEM, glob, obj, tensor, write_pt

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")


def _python(code: str, timeout=120):
  return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True,
                        timeout=timeout)


@pytest.mark.parametrize("call", [
    "t._rebuild_tensor_v2(np.arange(16, dtype=np.float32), 0, (2,), (-10**10,))",  # segfaulted (exit 139)
    "t._rebuild_tensor_v2(np.arange(16, dtype=np.float32), -1, (16,), (1,))",  # read before the array
    "t._rebuild_tensor_v2(np.arange(16, dtype=np.float32), 0, (4, 4), (4, -1))",
    "t._rebuild_tensor_v2(np.arange(16, dtype=np.float32), 0, (-1,), (1,))",
    "t._rebuild_tensor_v2(np.arange(16, dtype=np.float32), 0, (4,), (1, 1))",
    "t._rebuild_tensor_v2(np.arange(16, dtype=np.float32), 13, (2, 2), (2, 1))",
])
def test_the_issues_reproductions_raise_the_checkpoint_error_without_a_crash(call):
  out = _python("from ec_dit import errors; from ec_dit.convert import torch_pickle as t; import numpy as np\n"
                f"try:\n  {call}\nexcept errors.CheckpointError as e:\n  print('refused:', e)")
  assert out.returncode == 0 and out.stdout.startswith("refused:"), (out.returncode, out.stdout, out.stderr[-500:])


def test_in_bounds_views_still_load():
  s = np.arange(16, dtype=np.float32)
  np.testing.assert_array_equal(torch_pickle._rebuild_tensor_v2(s, 13, (3,), (1,)), [13, 14, 15])
  np.testing.assert_array_equal(torch_pickle._rebuild_tensor_v2(s, 15, (3,), (0,)), [15, 15, 15])  # broadcast
  assert torch_pickle._rebuild_tensor_v2(s, 16, (0, 5), (5, 1)).shape == (0, 5)


def _tiny_config_file(tmp_path):
  path = tmp_path / "tiny_config.py"
  path.write_text("import sys\nsys.path.insert(0, %r)\nfrom dit_moe_fixtures import tiny_config\n"
                  "def get_config(arg=None):\n  return tiny_config()\n" % str(REPO / "tests"))
  return path


def test_a_crafted_pt_is_one_line_exit_2_from_the_converter(tmp_path):
  bad = write_pt(tmp_path / "neg.pt", obj("w") + tensor(0, (2,), (-10**10,)) + SETITEM)
  assert os.path.getsize(bad) < 1000  # the issue's 658-byte file did this with exit 139
  out = subprocess.run([sys.executable, "-m", "ec_dit.convert", "dit_moe", "--checkpoint", str(bad), "--config",
                        str(_tiny_config_file(tmp_path)), "--out", str(tmp_path / "run")],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and out.stderr.count("\n") == 1, (out.returncode, out.stderr[-2000:])
  assert out.stderr.startswith(f"error: {bad}: tensor of size (2,) and stride (-10000000000,)")
  assert not (tmp_path / "run" / "checkpoints").exists()
  # the other reproductions and the 660-byte file that asked for 1.9 GiB, in-process
  for name, body in [("before.pt", tensor(-1, (16,), (1,))), ("huge.pt", tensor(0, (1000, 500000), (0, 0))),
                     ("past.pt", tensor(10, (8,), (1,))), ("numel.pt", tensor(0, (4,), (1,), numel=10**12)),
                     ("evil.pt", glob("posix", "system") + obj(("true",)) + REDUCE)]:  # UnsafeCheckpointError
    path = write_pt(tmp_path / name, obj("w") + body + SETITEM)
    with pytest.raises(errors.CheckpointError, match=str(path)):
      torch_pickle.load(str(path))
    rc = convert_cli.main(["dit_moe", "--checkpoint", str(path), "--config", str(_tiny_config_file(tmp_path)),
                           "--out", str(tmp_path / "run")])
    assert rc == 2


def test_build_and_setitem_cannot_change_the_allowed_globals(tmp_path):
  attacks = {
      "dtype": glob("torch", "FloatStorage") + obj({"dtype": "int8"}) + BUILD,
      "defaults": glob("torch._utils", "_rebuild_tensor_v2") + obj((None, {"__defaults__": (True,)})) + BUILD,
      "dict": glob("torch._utils", "_rebuild_parameter") + obj({"x": 1}) + BUILD,
      "setitem": glob("collections", "OrderedDict") + obj("k") + obj(1) + SETITEM,
  }
  for name, ops in attacks.items():
    path = write_pt(tmp_path / f"{name}.pt", obj("a") + ops + SETITEM)
    with pytest.raises(errors.CheckpointError):
      torch_pickle.load(str(path))
  sd = torch_pickle.load(str(CHECKPOINT))["ema"]  # a legitimate file still loads, dtypes intact
  assert sd["pos_embed"].dtype == np.float32 and sd["blocks.0.moe.experts.3.down_proj.weight"].shape == (64, 128)
  assert torch_pickle._rebuild_tensor_v2.__defaults__ == (False, None, None)


def test_fresh_globals_per_load(tmp_path):
  u1 = torch_pickle.RestrictedUnpickler(io.BytesIO(), None)
  u2 = torch_pickle.RestrictedUnpickler(io.BytesIO(), None)
  assert u1.find_class("torch", "FloatStorage") is not u2.find_class("torch", "FloatStorage")
  with pytest.raises(errors.CheckpointError):
    u1.find_class("torch", "FloatStorage").dtype = np.int8


def test_fuzzed_fixtures_load_the_same_or_are_refused_never_crash(record_property):
  """Random mutations of tiny.pt (its pickle, re-zipped; its raw bytes) and tiny_subset.safetensors."""
  seconds = float(os.environ.get("EC_DIT_FUZZ_SECONDS", "20"))
  out = subprocess.run([sys.executable, str(REPO / "tests" / "untrusted_pickles.py"), str(seconds), "0"],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=seconds + 120)
  assert out.returncode == 0, (out.returncode, out.stdout[-1000:], out.stderr[-3000:])
  counts = json.loads(out.stdout.strip().splitlines()[-1])
  record_property("report", f"unpickler fuzz: {counts}")  # printed in the run's summary (tests/conftest.py)
  assert counts["tried"] >= 300 and counts["refused"] > 0 and counts["same"] > 0, counts
  assert counts["tried"] == counts["refused"] + counts["same"] + counts["loaded_other"]
