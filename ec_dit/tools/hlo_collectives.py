"""The collectives of a compiled program, read from its HLO text: count and bytes per kind.

Each collective instruction (`all-to-all`, `all-gather`, `reduce-scatter`, `all-reduce`,
`collective-permute`, their asynchronous `-start` forms, and `ragged-all-to-all` counted as
all-to-all) is counted once per appearance in the text; `-done` halves are not counted. The
programs compiled here unroll their blocks, so that is once per step (a collective inside a
while loop would be undercounted).

`bytes` is the size of each collective's result on one device. `ici_bytes` is what one device
sends over the interconnect for it, with the textbook ring factors for a group of n devices:
all-gather, reduce-scatter and all-to-all (n-1)/n of the full array, all-reduce 2(n-1)/n,
collective-permute all of it.
"""

from __future__ import annotations

import math
import re

KINDS = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")
_OPS = {k: k for k in KINDS} | {f"{k}-start": k for k in KINDS} | {"ragged-all-to-all": "all-to-all"}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s([a-z\-]+)\(")
_ARRAY = re.compile(r"\b(pred|s4|u4|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64|c64|c128|f8e\w+)\[([\d,]*)\]")
_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "s32": 32, "u32": 32, "s64": 64,
         "u64": 64, "f16": 16, "bf16": 16, "f32": 32, "f64": 64, "c64": 64, "c128": 128}


def _array_bytes(text: str) -> int:
  total = 0
  for dtype, dims in _ARRAY.findall(text):
    n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    total += n * _BITS.get(dtype, 8) // 8
  return total


def _top_level(shape: str) -> list[str]:
  """The elements of a tuple shape "(a, (b, c), d)" at depth one; [shape] when it is not a tuple."""
  shape = shape.strip()
  if not shape.startswith("("):
    return [shape]
  parts, depth, start = [], 0, 1
  for i, ch in enumerate(shape):
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 1:
      parts.append(shape[start:i])
      start = i + 1
  parts.append(shape[start:shape.rindex(")")])
  return parts


def _result_bytes(shape: str, op: str) -> int:
  """Bytes of the collective's result: an async start's tuple holds (operands, results, [contexts])."""
  if op.endswith("-start") and op != "all-reduce-start":
    parts = _top_level(shape)
    return _array_bytes(parts[1] if len(parts) > 1 else parts[0])
  return _array_bytes(shape)


def group_size(line: str) -> int:
  """Devices per replica group of a collective instruction (1 when it names none)."""
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
  if m:
    return len(m.group(1).split(","))
  m = re.search(r"replica_groups=\[([\d,]+)\]<=", line)
  if m:
    return int(m.group(1).split(",")[-1])
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
  if m:
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
    return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", m.group(2)) if a in sizes)
  m = re.search(r"source_target_pairs=\{(.*?)\}\}", line)
  if m:
    return 2
  return 1


def _ici_factor(kind: str, n: int) -> float:
  if n <= 1:
    return 0.0
  if kind == "all-reduce":
    return 2 * (n - 1) / n
  if kind == "collective-permute":
    return 1.0
  return (n - 1) / n


def collectives(hlo_text: str) -> dict[str, dict[str, float]]:
  """{kind: {"count", "bytes", "ici_bytes"}} for every kind in KINDS (zeros when absent)."""
  out = {k: {"count": 0, "bytes": 0, "ici_bytes": 0.0} for k in KINDS}
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if not m or m.group(2) not in _OPS:
      continue
    op, kind = m.group(2), _OPS[m.group(2)]
    nbytes = _result_bytes(m.group(1), op)
    if kind == "reduce-scatter":  # the result is 1/n of what is reduced
      nbytes_full = nbytes * group_size(line)
    else:
      nbytes_full = nbytes
    row = out[kind]
    row["count"] += 1
    row["bytes"] += nbytes
    row["ici_bytes"] += nbytes_full * _ici_factor(kind, group_size(line))
  return out
