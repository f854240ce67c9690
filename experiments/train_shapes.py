"""The configs `benchmark_train.py` times, their model FLOPs, and the float32 matmul rate it divides by.

DiT-MoE-S/2-8E2A shapes (configs/dit_moe.py "S-8E2A"): width 384, 12 blocks, 6
heads, 32x32x4 latents at patch 2 (256 tokens), an MoE in every block with
8 bias-free SwiGLU experts of width 4d and a shared SwiGLU expert of width 2d,
batch 8, AdamW. Variants (`S2_VARIANTS`):

  s2_dense     one SwiGLU of width 10d per block, no router: the activated FLOPs
               of two 4d experts plus the 2d shared one
  s2_ec        expert choice, capacity factor 2 ("S-8E2A-ec")
  s2_tc        token choice top-2, capacity factor 2, gather dispatch
  s2_dropless  token choice top-2, dropless (DiT-MoE's own setting)

Model FLOPs (`model_flops`, counted analytically, one multiply-add = 2 FLOPs):
the matmuls of the patch embedding, timestep MLP (per image), adaLN (per image),
attention (qkv, output, QK^T and AV over the 256 tokens), router (d x E), the
FFN at its *activated* rows (two expert evaluations per token for top-2 and for
expert choice at capacity factor 2, padding slots of a capacity buffer not
counted), the shared expert and the final layer. Training = 3 x forward
(backward = two matmuls per forward matmul). Elementwise work, the loss and the
optimizer are not counted: they are what the ratio to the matmul rate exposes.
"""

from __future__ import annotations

import importlib.util
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

S2_VARIANTS = ("s2_dense", "s2_ec", "s2_tc", "s2_dropless")
S2_BATCH = 8
MATMUL_N = 2048


def load_module(tree: pathlib.Path, name: str):
  """configs/<name>.py of the source tree `tree`."""
  spec = importlib.util.spec_from_file_location(name, tree / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def s2_config(tree: pathlib.Path, variant: str):
  """The DiT-MoE-S/2-8E2A config of `variant` (one of S2_VARIANTS), batch 8, AdamW."""
  module = load_module(tree, "dit_moe")
  config = module.get_config("S-8E2A-ec" if variant == "s2_ec" else "S-8E2A")
  f = config.model.ffn
  if variant == "s2_dense":
    f.kind = "dense"
    f.dense_mlp_ratio = f.top_k * config.model.mlp_ratio + f.num_shared_experts  # 2 x 4d + 2d = 10d
  elif variant == "s2_tc":
    f.token_capacity_factor = 2.0
  config.batch_size = S2_BATCH
  return config


def s2_batch(config, seed: int = 0) -> dict:
  """A batch of random latents and labels (the input pipeline is not timed)."""
  rng = np.random.default_rng(seed)
  m = config.model
  shape = (config.batch_size, m.input_size, m.input_size, m.in_channels)
  return {"image": jnp.asarray(rng.standard_normal(shape, dtype=np.float32)),
          "label": jnp.asarray(rng.integers(0, m.class_cond.num_classes, config.batch_size, dtype=np.int32))}


def ffn_macs_per_token(config) -> int:
  """Multiply-adds per token of the FFN at its activated rows (router included)."""
  m, f = config.model, config.model.ffn
  d = m.hidden_size
  swiglu = lambda width: 3 * d * width  # noqa: E731  gate, up, down
  if f.kind == "dense":
    return swiglu(int(f.dense_mlp_ratio * d))
  # top-k: k evaluations per token; expert choice: capacity_factor evaluations per token on average
  per_token = f.top_k if f.kind == "token_choice" else f.train_capacity_factor
  return int(per_token * swiglu(int(m.mlp_ratio * d)) + swiglu(f.num_shared_experts * d) + d * f.num_experts)


def model_flops(config) -> dict:
  """{"fwd_per_token", "ffn_fwd_per_token", "train_per_step"} model FLOPs of a DiT-MoE config (module docstring)."""
  m = config.model
  d, p = m.hidden_size, m.patch_size
  tokens = (m.input_size // p) ** 2
  out_ch = m.in_channels * (2 if m.class_cond.learn_sigma else 1)
  per_image = 256 * d + d * d + m.depth * 6 * d * d + 2 * d * d  # timestep MLP, adaLN of blocks and final layer
  attn = 4 * d * d + 2 * tokens * d  # qkv + out; QK^T and AV
  ffn = ffn_macs_per_token(config)
  macs = p * p * m.in_channels * d + m.depth * (attn + ffn) + d * p * p * out_ch + per_image / tokens
  fwd = 2 * macs
  return {"fwd_per_token": fwd, "ffn_fwd_per_token": 2 * ffn,
          "train_per_step": 3 * fwd * tokens * config.batch_size}


class Matmul:
  """A jitted MATMUL_N x MATMUL_N float32 jnp.dot: the reference rate of this machine."""

  def __init__(self, n: int = MATMUL_N):
    self.a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    self.fn = jax.jit(lambda a: jnp.dot(a, a))
    self.flops = 2 * n ** 3
    jax.block_until_ready(self.fn(self.a))

  def rate(self, reps: int = 5) -> float:
    """FLOP/s of `reps` back-to-back products, after one untimed product.

    The untimed one lets the thread pool and the output buffers settle after a
    variant's step: timed cold, the rate read about half of a standalone run's.
    """
    jax.block_until_ready(self.fn(self.a))
    t = time.perf_counter()
    for _ in range(reps):
      out = self.fn(self.a)
    jax.block_until_ready(out)
    return reps * self.flops / (time.perf_counter() - t)
