"""Imports DiT-MoE checkpoints (feizc/DiT-MoE's released `.pt` files, or `.safetensors`) into a run directory.

    python -m ec_dit.convert dit_moe --checkpoint dit_moe_s_8E2A.pt \\
        --config configs/dit_moe.py:S-8E2A --out runs/dit_moe_s_8E2A

The PyTorch state dict is read without PyTorch (`ec_dit.convert.torch_pickle`), mapped
name by name onto `ec_dit.model.dit_moe.DiTMoE` (`convert_state_dict`), checked
against the config (missing and unexpected keys, shapes, experts per block,
depth, attention kind), and written as a run directory: `config.json` and an
Orbax checkpoint at step 0 in the training layout (`ec_dit.checkpoint`): the
weights as both the parameters and the EMA, with a fresh optimizer state.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from ec_dit import checkpoint, errors
from ec_dit.convert import torch_pickle
from ec_dit.convert import mapping
from ec_dit.convert.mapping import CheckpointMismatch  # noqa: F401 (also this module's public name)
from ec_dit.model import dit_moe
from ec_dit.training import optimizers


def load_state_dict(path: str, weights: str = "auto") -> dict[str, np.ndarray]:
  """The flat {name: array} state dict of a checkpoint file.

  A torch.save file may hold the state dict itself or a training checkpoint
  {"model", "ema", ...}; `weights` picks "ema" or "model" ("auto": "ema" if
  present, else "model", else the file itself, as DiT-MoE's `find_model`).
  """
  obj = torch_pickle.load(path)
  if not isinstance(obj, dict):
    raise errors.CheckpointError(f"{path}: expected a state dict (a dict of tensors), got {type(obj).__name__}")
  if weights not in ("auto", "ema", "model"):
    raise errors.CheckpointError(f"weights must be 'auto', 'ema' or 'model', got {weights!r}")
  if weights == "auto":
    weights = "ema" if "ema" in obj else "model" if "model" in obj else ""
  if weights:
    if weights not in obj:
      raise errors.CheckpointError(f"{path}: no {weights!r} entry; top-level keys: {sorted(map(str, obj))[:10]}")
    obj = obj[weights]
  if not isinstance(obj, dict):
    raise errors.CheckpointError(f"{path}: the {weights!r} entry is a {type(obj).__name__}, not a state dict")
  bad = [k for k, v in obj.items() if not isinstance(v, np.ndarray) or not isinstance(k, str)]
  if bad:
    raise errors.CheckpointError(f"{path}: entries that are not named tensors: {[repr(k)[:80] for k in bad[:5]]}")
  return {k: v for k, v in obj.items()}


def _t(w):
  return np.ascontiguousarray(np.asarray(w, np.float32).T)


def _linear(sd, src, used, *, bias=True):
  """A torch Linear (weight [out, in]) as our kernel [in, out] and bias."""
  used.update({f"{src}.weight"} | ({f"{src}.bias"} if bias else set()))
  out = {"kernel": _t(sd[f"{src}.weight"])}
  if bias:
    out["bias"] = np.asarray(sd[f"{src}.bias"], np.float32)
  return out


def _check_layout(sd, config):
  """Depth, experts per block and attention kind, checked first: their errors say what to change."""
  m = config.model
  depth = mapping.count_indexed(sd, r"blocks\.(\d+)\.")
  experts = mapping.count_indexed(sd, r"blocks\.0\.moe\.experts\.(\d+)\.")
  problems = []
  if depth != m.depth:
    problems.append(f"the checkpoint has {depth} blocks, config.model.depth={m.depth}")
  if experts != m.ffn.num_experts:
    problems.append(f"the checkpoint has {experts} experts per block, config.model.ffn.num_experts="
                    f"{m.ffn.num_experts}")
  flash = any(k.startswith("blocks.0.attn.Wqkv.") for k in sd)
  if flash != m.class_cond.qk_norm:
    kind = "flash-attention blocks (attn.Wqkv, q_norm, k_norm)" if flash else "timm attention (attn.qkv)"
    problems.append(f"the checkpoint has {kind}: set config.model.class_cond.qk_norm={flash}")
  if problems:
    raise CheckpointMismatch("checkpoint does not match the config: " + "; ".join(problems))


def _map(sd, config, used):
  """Our parameter tree from DiT-MoE's names (raises KeyError on the first missing name)."""
  m = config.model
  p, c = m.patch_size, m.in_channels
  w = np.asarray(sd["x_embedder.proj.weight"], np.float32)  # conv [D, C, p, p] -> [p*p*C, D] (row, col, channel)
  used.update({"x_embedder.proj.weight", "pos_embed"})
  params = {
      "patch_embed": {"proj": {"kernel": w.transpose(2, 3, 1, 0).reshape(p * p * c, -1),
                               "bias": np.asarray(sd["x_embedder.proj.bias"], np.float32)}},
      "t_embed": {"fc1": _linear(sd, "t_embedder.mlp.0", used), "fc2": _linear(sd, "t_embedder.mlp.2", used)},
      "y_embed": {"table": np.asarray(sd["y_embedder.embedding_table.weight"], np.float32)},
      "final": {"adaln": _linear(sd, "final_layer.adaLN_modulation.1", used),
                "proj": _linear(sd, "final_layer.linear", used)},
      "blocks": {},
  }
  used.update({"x_embedder.proj.bias", "y_embedder.embedding_table.weight"})
  for i in range(m.depth):
    b = f"blocks.{i}"
    if m.class_cond.qk_norm:
      attn = {"qkv": _linear(sd, f"{b}.attn.Wqkv", used), "proj": _linear(sd, f"{b}.attn.out_proj", used)}
      for ours, theirs in (("q_scale", "q_norm.weight"), ("q_bias", "q_norm.bias"), ("k_scale", "k_norm.weight"),
                           ("k_bias", "k_norm.bias")):
        attn[ours] = np.asarray(sd[f"{b}.attn.{theirs}"], np.float32)
        used.add(f"{b}.attn.{theirs}")
    else:
      attn = {"qkv": _linear(sd, f"{b}.attn.qkv", used), "proj": _linear(sd, f"{b}.attn.proj", used)}
    experts = [f"{b}.moe.experts.{e}" for e in range(m.ffn.num_experts)]
    stack = lambda proj: np.stack([_linear(sd, f"{e}.{proj}", used, bias=False)["kernel"] for e in experts])  # noqa: E731
    moe = {"routed": {"router": {"proj": _linear(sd, f"{b}.moe.gate", used, bias=False)},
                      "experts": {"wg": stack("gate_proj"), "wi": stack("up_proj"), "wo": stack("down_proj")}}}
    if m.ffn.num_shared_experts > 0:
      moe["shared"] = {name: _linear(sd, f"{b}.moe.shared_experts.{name}_proj", used, bias=False)
                       for name in ("gate", "up", "down")}
    params["blocks"][i] = {"adaln": _linear(sd, f"{b}.adaLN_modulation.1", used), "attn": attn, "moe": moe}
  return params


def convert_state_dict(sd: dict[str, np.ndarray], config) -> dict:
  """DiT-MoE's state dict as our parameter tree (float32 numpy), checked against `config`.

  Raises CheckpointMismatch listing missing keys, unexpected keys or shape
  mismatches (with names and shapes), or a different depth, number of experts or
  attention kind. `pos_embed` (fixed sin-cos) must equal ours.
  """
  _check_layout(sd, config)
  used: set[str] = set()
  try:
    params = _map(sd, config, used)
  except KeyError as e:
    expected = _expected_names(config)
    missing = sorted(expected - set(sd))
    raise CheckpointMismatch(f"checkpoint is missing {len(missing)} keys the config needs: {missing[:20]}") from e
  unexpected = sorted(set(sd) - used)
  if unexpected:
    raise CheckpointMismatch(f"checkpoint has {len(unexpected)} unexpected keys: {unexpected[:20]}")
  target = dit_moe.abstract_params(config)
  bad = []
  jax.tree_util.tree_map_with_path(
      lambda path, a, t: bad.append(f"{jax.tree_util.keystr(path)}: checkpoint {a.shape}, config {t.shape}")
      if a.shape != t.shape else None, params, target)
  if bad:
    raise CheckpointMismatch(f"shape mismatches (ours from the checkpoint vs the config): {bad[:20]}")
  if "pos_embed" in sd:
    grid = config.model.input_size // config.model.patch_size
    ours = dit_moe.dit_pos_embed(config.model.hidden_size, grid)
    theirs = np.asarray(sd["pos_embed"], np.float32).reshape(-1, config.model.hidden_size)
    if theirs.shape != ours.shape or not np.allclose(theirs, ours, atol=1e-4):
      raise CheckpointMismatch(f"pos_embed {theirs.shape} is not DiT's fixed sin-cos embedding for a "
                               f"{grid}x{grid} grid of width {config.model.hidden_size}")
  return params


def _expected_names(config) -> set[str]:
  """Every state-dict name DiT-MoE's model of this config has (for the missing-keys error)."""
  m = config.model
  names = {"pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias", "y_embedder.embedding_table.weight"}
  lin = lambda s, bias=True: {f"{s}.weight"} | ({f"{s}.bias"} if bias else set())  # noqa: E731
  for s in ("t_embedder.mlp.0", "t_embedder.mlp.2", "final_layer.adaLN_modulation.1", "final_layer.linear"):
    names |= lin(s)
  for i in range(m.depth):
    b = f"blocks.{i}"
    if m.class_cond.qk_norm:
      names |= lin(f"{b}.attn.Wqkv") | lin(f"{b}.attn.out_proj") | lin(f"{b}.attn.q_norm") | lin(f"{b}.attn.k_norm")
    else:
      names |= lin(f"{b}.attn.qkv") | lin(f"{b}.attn.proj")
    names |= lin(f"{b}.adaLN_modulation.1") | lin(f"{b}.moe.gate", False)
    for e in range(m.ffn.num_experts):
      names |= {f"{b}.moe.experts.{e}.{n}_proj.weight" for n in ("gate", "up", "down")}
    if m.ffn.num_shared_experts > 0:
      names |= {f"{b}.moe.shared_experts.{n}_proj.weight" for n in ("gate", "up", "down")}
  return names


def write_run(config, params: dict, out_dir: str, *, ema: dict | None = None, opt_state=None, step: int = 0) -> str:
  """Writes `out_dir/config.json` and a checkpoint at `step` (default 0): the state with `opt_state` (default:
  a fresh optimizer of `config`) and the EMA weights (default: the parameters)."""
  os.makedirs(out_dir, exist_ok=True)
  if os.path.isdir(checkpoint.checkpoint_dir(out_dir)) and os.listdir(checkpoint.checkpoint_dir(out_dir)):
    raise FileExistsError(f"{checkpoint.checkpoint_dir(out_dir)} already holds checkpoints; choose a new --out")
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config.to_dict(), f, indent=2, default=list)
  params = jax.tree.map(np.asarray, params)
  if opt_state is None:
    opt_state = optimizers.make_optimizer(config).init(params)
  state = {"step": np.asarray(step, np.int32), "params": params, "opt_state": jax.device_get(opt_state)}
  ema = jax.tree.map(np.copy, params) if ema is None else jax.tree.map(np.asarray, ema)
  manager = checkpoint.make_manager(out_dir, keep=1, async_save=False)
  checkpoint.save(manager, step, state, ema, force=True)
  manager.wait_until_finished()
  manager.close()
  return out_dir
