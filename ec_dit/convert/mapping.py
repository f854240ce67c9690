"""Building our parameter tree from a PyTorch-layout state dict, name by name, with every tensor accounted for.

`Mapping` reads source tensors (a flat {name: numpy array} dict), records which
were used and where each target parameter came from, and `finish` checks the
result against the model's abstract parameters: a missing tensor, an unused
(unexpected) one or a shape mismatch raises `CheckpointMismatch` naming the
source tensor.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from flax import nnx

from ec_dit import errors


class CheckpointMismatch(errors.CheckpointError):
  """The checkpoint does not fit the model its config describes; the message names the tensors."""


def count_indexed(names, pattern: str) -> int:
  r"""One more than the largest index `pattern`'s first group matches in `names` (a state dict's keys), else 0:
  `count_indexed(sd, r"blocks\.(\d+)\.")` is the number of blocks."""
  found = {int(m.group(1)) for n in names for m in [re.match(pattern, n)] if m}
  return max(found) + 1 if found else 0


def with_weights(model: nnx.Module, params) -> nnx.Module:
  """`model` (an abstract one, from `nnx.eval_shape`) with the converted `params` put in, in eval mode."""
  nnx.update(model, params)
  model.eval()
  return model


def _show(names, n: int = 8) -> str:
  names = sorted(names)
  return f"{names[:n]}" + (f" ... ({len(names) - n} more)" if len(names) > n else "")


class Mapping:
  """Targets (tuples of tree keys) -> float32 arrays, each remembering its source tensors."""

  def __init__(self, tensors: dict[str, np.ndarray], origin: str):
    self.tensors, self.origin = tensors, origin
    self.used: set[str] = set()
    self.flat: dict[tuple, np.ndarray] = {}
    self.source: dict[tuple, str] = {}
    self.missing: list[str] = []

  def get(self, name: str) -> np.ndarray | None:
    if name not in self.tensors:
      self.missing.append(name)
      return None
    self.used.add(name)
    return np.asarray(self.tensors[name], np.float32)

  def put(self, target: tuple, value: np.ndarray | None, source: str) -> None:
    if value is not None:
      self.flat[target], self.source[target] = np.ascontiguousarray(value, np.float32), source

  def copy(self, target: tuple, name: str) -> None:
    self.put(target, self.get(name), name)

  def linear(self, target: tuple, *names: str, bias: bool = True) -> None:
    """torch Linear(s) [out, in] -> our kernel [in, sum(out)] (several are concatenated, e.g. q, k, v) and bias."""
    weights = [self.get(f"{n}.weight") for n in names]
    label = " + ".join(names)
    for n, w in zip(names[1:], weights[1:]):
      if w is not None and weights[0] is not None and w.shape != weights[0].shape:
        raise CheckpointMismatch(f"{self.origin}: tensor {n}.weight has shape {tuple(w.shape)}, but "
                                 f"{names[0]}.weight, fused with it, has {tuple(weights[0].shape)}")
    if all(w is not None for w in weights):
      self.put(target + ("kernel",), np.concatenate([w.T for w in weights], axis=1), label + " (.weight)")
    if bias:
      biases = [self.get(f"{n}.bias") for n in names]
      if all(b is not None for b in biases):
        self.put(target + ("bias",), np.concatenate(biases), label + " (.bias)")

  def conv_patch(self, target: tuple, name: str) -> None:
    """A patchifying Conv2d [D, C, p, p] -> our patch projection [p*p*C, D] (row, column, channel) and bias."""
    w = self.get(f"{name}.weight")
    if w is not None:
      d, c, p, _ = w.shape
      self.put(target + ("kernel",), w.transpose(2, 3, 1, 0).reshape(p * p * c, d), f"{name}.weight")
    self.copy(target + ("bias",), f"{name}.bias")

  def finish(self, abstract_params: dict, *, ignore=lambda name: False) -> dict:
    """The nested parameter tree, checked: no missing or unexpected tensors, every shape as the config wants."""
    if self.missing:
      raise CheckpointMismatch(f"{self.origin}: missing tensors the config needs: {_show(self.missing)}")
    unexpected = [n for n in self.tensors if n not in self.used and not ignore(n)]
    if unexpected:
      raise CheckpointMismatch(f"{self.origin}: unexpected tensors (not in a model of this config): "
                               f"{_show(unexpected)}")
    targets = {tuple(_key(k) for k in path): leaf
               for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
    for target, leaf in targets.items():
      if target not in self.flat:
        raise AssertionError(f"internal mapping error: nothing maps to {target}")
      if tuple(self.flat[target].shape) != tuple(leaf.shape):
        raise CheckpointMismatch(f"{self.origin}: tensor {self.source[target]} has shape "
                                 f"{tuple(self.flat[target].shape)} (as {'.'.join(map(str, target))}), the config "
                                 f"expects {tuple(leaf.shape)}")
    extra = set(self.flat) - set(targets)
    if extra:
      raise AssertionError(f"internal mapping error: unknown targets {sorted(map(str, extra))[:5]}")
    tree: dict = {}
    for target, value in self.flat.items():
      node = tree
      for k in target[:-1]:
        node = node.setdefault(k, {})
      node[target[-1]] = value
    return tree


def _key(k):
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return getattr(k, attr)
  return k
