"""The restricted torch.save reader: loads the reference-format checkpoint without torch, refuses code."""

import io
import os
import pickle
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest

from ec_dit import errors
from ec_dit.convert import torch_pickle
from dit_moe_fixtures import CHECKPOINT, FIXTURES


def test_loads_the_reference_checkpoint_without_torch():
  assert "torch" not in sys.modules  # CI has no torch; nothing here imports it
  obj = torch_pickle.load(str(CHECKPOINT))
  assert sorted(obj) == ["ema", "model"]
  sd = obj["ema"]
  assert type(sd).__name__ == "OrderedDict" and len(sd) == 56 and hasattr(sd, "_metadata")
  w = sd["blocks.0.moe.experts.3.down_proj.weight"]
  assert w.dtype == ml_dtypes.bfloat16 and w.shape == (64, 128)
  assert sd["pos_embed"].dtype == np.float32 and sd["pos_embed"].shape == (1, 16, 64)
  assert sd["x_embedder.proj.weight"].shape == (64, 4, 2, 2)
  # "model" and "ema" share storages in the file: both read as equal arrays
  assert all(np.array_equal(sd[k], obj["model"][k]) for k in sd)
  assert "torch" not in sys.modules


def test_safetensors_written_by_the_library_match_the_pt_file():
  sub = torch_pickle.load(str(FIXTURES / "tiny_subset.safetensors"))
  sd = torch_pickle.load(str(CHECKPOINT))["model"]
  assert sub["blocks.0.moe.gate.weight"].dtype == np.float32
  assert sub["final_layer.linear.bias"].dtype == np.float16
  assert sub["y_embedder.embedding_table.weight"].dtype == ml_dtypes.bfloat16
  for k, v in sub.items():
    np.testing.assert_array_equal(v.astype(np.float32), sd[k].astype(np.float32), err_msg=k)


class _Exploit:
  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return os.system, (f"touch {self.path}",)


def test_a_pickle_calling_os_system_is_refused_before_anything_runs(tmp_path):
  marker = tmp_path / "pwned"
  payload = pickle.dumps({"weight": _Exploit(marker)}, protocol=2)
  assert b"system" in payload
  with pytest.raises(torch_pickle.UnsafeCheckpointError, match=r"refusing to load global posix\.system"):
    torch_pickle.RestrictedUnpickler(io.BytesIO(payload), read_storage=None).load()
  # the same pickle inside a torch.save-style zip archive
  path = tmp_path / "evil.pt"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", payload)
    z.writestr("archive/version", "3\n")
  with pytest.raises(torch_pickle.UnsafeCheckpointError, match=r"evil\.pt: refusing to load global posix\.system"):
    torch_pickle.load(str(path))
  assert not marker.exists()
  pickle.loads(payload)  # the plain unpickler would have run it: the test's pickle is a real exploit
  assert marker.exists()


def test_other_refusals_and_format_errors(tmp_path):
  class Pid(pickle.Pickler):
    def persistent_id(self, obj):
      return ("module", "os") if obj == "x" else None

  buf = io.BytesIO()
  Pid(buf, protocol=2).dump(["x"])
  with pytest.raises(torch_pickle.UnsafeCheckpointError, match="only tensor storages"):
    torch_pickle.RestrictedUnpickler(io.BytesIO(buf.getvalue()), read_storage=None).load()
  legacy = tmp_path / "legacy.pt"
  legacy.write_bytes(pickle.dumps({"a": 1}))
  with pytest.raises(ValueError, match="not a torch.save zip archive"):
    torch_pickle.load(str(legacy))
  with pytest.raises(FileNotFoundError, match="not found"):
    torch_pickle.load(str(tmp_path / "missing.pt"))


def test_rebuild_tensor_handles_strides_and_offsets():
  storage = np.arange(12, dtype=np.float32)
  t = torch_pickle._rebuild_tensor_v2(storage, 2, (3, 2), (1, 3))  # a transposed view at offset 2
  np.testing.assert_array_equal(t, np.array([[2, 5], [3, 6], [4, 7]], np.float32))
  with pytest.raises(errors.CheckpointError, match="overruns its storage"):
    torch_pickle._rebuild_tensor_v2(storage, 10, (3,), (1,))
