"""Hand-made torch.save files (crafted pickles) and the unpickler fuzzer of tests/test_untrusted_files.py.

`python tests/untrusted_pickles.py SECONDS SEED` mutates the committed fixtures
(tests/fixtures/dit_moe/tiny.pt, tiny_subset.safetensors) for about SECONDS, loads
each mutation with `ec_dit.convert.torch_pickle.load` and prints one JSON line of counts.
It runs in its own process so that a crash shows as an exit code, and caps its
address space at a multiple of the fixture's size above what a clean load used, so
an oversized allocation fails the run. A mutation must either raise
`ec_dit.errors.CheckpointError` or load to arrays whose values all come from the
file's storages (no out-of-bounds read); anything else is printed and exits 1.
"""

from __future__ import annotations

import io
import json
import pathlib
import pickle
import random
import resource
import sys
import tempfile
import time
import zipfile

import numpy as np

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "dit_moe"
MARK, TUPLE, REDUCE, BUILD, SETITEM, EMPTY_DICT, BINPERSID, STOP = b"(", b"t", b"R", b"b", b"s", b"}", b"Q", b"."


def glob(module: str, name: str) -> bytes:
  """The GLOBAL opcode for module.name."""
  return b"c" + f"{module}\n{name}\n".encode()


def obj(x) -> bytes:
  """The opcodes that push a plain value (protocol 2, no memo)."""
  buf = io.BytesIO()
  p = pickle.Pickler(buf, protocol=2)
  p.fast = True
  p.dump(x)
  return buf.getvalue()[2:-1]


def storage(key: str, numel: int, kind: str = "FloatStorage") -> bytes:
  """A persistent id for storage `key` (what torch.save writes for a tensor's storage)."""
  return MARK + obj("storage") + glob("torch", kind) + obj(key) + obj("cpu") + obj(numel) + TUPLE + BINPERSID


def tensor(offset, size, stride, key: str = "0", numel: int = 16) -> bytes:
  """_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())."""
  return (glob("torch._utils", "_rebuild_tensor_v2") + MARK + storage(key, numel) + obj(offset) + obj(tuple(size))
          + obj(tuple(stride)) + obj(False) + glob("collections", "OrderedDict") + obj(()) + REDUCE + TUPLE + REDUCE)


def write_pt(path, body: bytes, storages: dict[str, np.ndarray] | None = None) -> pathlib.Path:
  """A torch.save-style zip whose data.pkl is `{` + body + `}` (body: key, value, SETITEM, ...)."""
  storages = {"0": np.arange(16, dtype=np.float32)} if storages is None else storages
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", b"\x80\x02" + EMPTY_DICT + body + STOP)
    z.writestr("archive/byteorder", "little")
    for key, a in storages.items():
      z.writestr(f"archive/data/{key}", a.tobytes())
    z.writestr("archive/version", "3\n")
  return pathlib.Path(path)


# -- the fuzzer ----------------------------------------------------------------------------------------------

def _arrays(tree, out):
  if isinstance(tree, np.ndarray):
    out.append(tree)
  elif isinstance(tree, dict):
    for v in tree.values():
      _arrays(v, out)
  elif isinstance(tree, (list, tuple)):
    for v in tree:
      _arrays(v, out)
  return out


def _patterns(arrays) -> dict[int, np.ndarray]:
  """The sorted unique bit patterns of the arrays' elements, per item size."""
  by_size: dict[int, list] = {}
  for a in arrays:
    if a.size:
      by_size.setdefault(a.itemsize, []).append(np.ascontiguousarray(a).view(f"u{a.itemsize}").ravel())
  return {k: np.unique(np.concatenate(v)) for k, v in by_size.items()}


def _mutate(data: bytes, rng: random.Random) -> bytes:
  b = bytearray(data)
  kind = rng.randrange(5)
  i = rng.randrange(len(b))
  if kind == 0:
    b[i] = rng.randrange(256)
  elif kind == 1:
    b[i] = rng.choice((0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF))
  elif kind == 2:
    del b[i:i + rng.randrange(1, 9)]
  elif kind == 3:
    j = rng.randrange(len(b))
    b[i:i] = b[j:j + rng.randrange(1, 17)]
  else:
    for _ in range(rng.randrange(2, 9)):
      b[rng.randrange(len(b))] = rng.randrange(256)
  return bytes(b)


def _rezip(entries: list[tuple[str, bytes]], pkl_name: str, pkl: bytes) -> bytes:
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as z:
    for name, data in entries:
      z.writestr(name, pkl if name == pkl_name else data)
  return buf.getvalue()


def fuzz(seconds: float, seed: int) -> dict:
  """Mutates the fixtures for `seconds`; returns counts (raises on a violation)."""
  from ec_dit import errors
  from ec_dit.convert import torch_pickle  # noqa: PLC0415 - the fuzzer runs as a script

  rng = random.Random(seed)
  pt, st = FIXTURES / "tiny.pt", FIXTURES / "tiny_subset.safetensors"
  original = torch_pickle.load(str(pt))
  reference = _patterns(_arrays(original, []))
  with zipfile.ZipFile(pt) as z:
    entries = [(i.filename, z.read(i.filename)) for i in z.infolist()]
  pkl_name = next(n for n, _ in entries if n.endswith("data.pkl"))
  pkl = dict(entries)[pkl_name]
  raw_pt, raw_st = pt.read_bytes(), st.read_bytes()
  limit = torch_pickle.MAX_EXPANSION * len(raw_pt) + torch_pickle.MIN_BUDGET
  vm = resource.getrlimit(resource.RLIMIT_AS)
  with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmPeak"))
  cap = peak + 16 * len(raw_pt) + (64 << 20)  # above what a clean load used: 16x the file plus allocator slack
  resource.setrlimit(resource.RLIMIT_AS, (cap, vm[1]))
  counts = {"tried": 0, "refused": 0, "same": 0, "loaded_other": 0, "pickle": 0, "zip": 0, "safetensors": 0}
  t0 = time.time()
  with tempfile.TemporaryDirectory() as tmp:
    while time.time() - t0 < seconds:
      kind = rng.choice(("pickle", "pickle", "zip", "safetensors"))
      if kind == "pickle":
        data, path = _rezip(entries, pkl_name, _mutate(pkl, rng)), f"{tmp}/m.pt"
      elif kind == "zip":
        data, path = _mutate(raw_pt, rng), f"{tmp}/m.pt"
      else:
        data, path = _mutate(raw_st, rng), f"{tmp}/m.safetensors"
      pathlib.Path(path).write_bytes(data)
      counts["tried"] += 1
      counts[kind] += 1
      try:
        result = torch_pickle.load(path)
      except errors.CheckpointError:
        counts["refused"] += 1
        continue
      except Exception as e:  # noqa: BLE001 - any other exception is a finding
        raise AssertionError(f"mutation {counts['tried']} ({kind}, seed {seed}) raised {type(e).__name__}: {e}")
      arrays = _arrays(result, [])
      total = sum(a.nbytes for a in arrays)
      assert total <= limit, f"mutation {counts['tried']} ({kind}): arrays of {total} bytes from {len(data)}"
      if kind != "safetensors":  # every value must be one the file's storages hold (no out-of-bounds read)
        for size, found in _patterns(arrays).items():
          ok = size in reference and np.isin(found, reference[size]).all()
          assert ok, f"mutation {counts['tried']} ({kind}, seed {seed}) loaded values not in any storage"
        same = isinstance(result, dict) and result.keys() == original.keys() and all(
            len(_arrays(result[k], [])) == len(_arrays(original[k], [])) and all(
                a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))
                for a, b in zip(_arrays(result[k], []), _arrays(original[k], []))) for k in original)
        counts["same" if same else "loaded_other"] += 1
      else:
        counts["loaded_other"] += 1
  counts["seconds"] = round(time.time() - t0, 1)
  counts["address_space_cap_mb"] = cap >> 20
  return counts


if __name__ == "__main__":
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  print(json.dumps(fuzz(float(sys.argv[1]), int(sys.argv[2]))), flush=True)
