"""Muon for the transformer's hidden matrices, AdamW for everything else.

Muon (Jordan et al. 2024; Liu et al. 2025, "Muon is scalable for LLM
training") keeps Nesterov momentum per weight matrix and replaces each update
by its nearest semi-orthogonal matrix, computed with a few Newton-Schulz
iterations. Updates are rescaled to AdamW's typical RMS (0.2 x
sqrt(max(fan_in, fan_out)), Moonlight's rule) so one learning-rate schedule
serves both halves of the optimizer.

Which parameters are "hidden matrices" (:func:`param_labels`): the 2-D
kernels inside the DiT blocks and the text encoder's layers, and the stacked
expert matrices ``[E, in, out]`` (each expert orthogonalised on its own). The
router, embeddings, input and output projections, biases and norms use AdamW,
as in the papers.

Why not ``optax.contrib.muon``: it orthogonalises every leaf separately.
Here matrices of the same shape are stacked and go through one batched
Newton-Schulz iteration (fewer, larger matmuls; on the tiny CPU config only
slightly faster, as the matmul FLOPs dominate), and the optimizer state is a
plain momentum tree whose leaves mirror the parameters, which
:func:`ec_dit.sharding.opt_state_shardings` maps onto their shardings.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Quintic Newton-Schulz coefficients tuned for fast convergence of small
# singular values (Jordan et al.); the result has singular values in ~[0.7, 1.2].
NS_COEFFS = (3.4445, -4.7750, 2.0315)
# Updates are scaled to this RMS, AdamW's typical update RMS (Liu et al. 2025).
MATCHED_RMS = 0.2


def newton_schulz(x: jax.Array, steps: int) -> jax.Array:
  """Approximately orthogonalise every matrix of ``x`` [b, m, n] (m <= n), in float32.

  Each step is X <- a X + (b G + c G^2) X with G = X X^T. For wide matrices
  (:func:`_gram_is_cheaper`) the steps run on m x m matrices only: every X_k
  is Q_k X_0 with Q_k a polynomial in G_0, so Q and G are updated
  (P = a + b G + c G^2, Q <- P Q, G <- P G P) and X_0 is multiplied once at the
  end. The same map up to float rounding (tests/test_muon.py), fewer FLOPs.
  """
  x = x.astype(jnp.float32)
  x = x / (jnp.sqrt(jnp.sum(x * x, axis=(1, 2), keepdims=True)) + 1e-7)
  if _gram_is_cheaper(x.shape[1], x.shape[2], steps):
    return _newton_schulz_gram(x, steps)
  a, b, c = NS_COEFFS
  for _ in range(steps):  # unrolled: a handful of steps, and XLA fuses the scalings
    gram = jnp.einsum("bmn,bkn->bmk", x, x)
    poly = b * gram + c * jnp.einsum("bmk,bkj->bmj", gram, gram)
    x = a * x + jnp.einsum("bmk,bkn->bmn", poly, x)
  return x


def _gram_is_cheaper(m: int, n: int, steps: int) -> bool:
  """Matmul FLOPs of the m x m iteration below those of the m x n one."""
  direct = steps * (4 * m * m * n + 2 * m ** 3)
  gram = 4 * m * m * n + (4 * steps - 3) * 2 * m ** 3
  return gram < direct


def _newton_schulz_gram(x: jax.Array, steps: int) -> jax.Array:
  """:func:`newton_schulz`'s steps on the m x m Gram matrix of the normalised ``x`` [b, m, n]."""
  a, b, c = NS_COEFFS
  mm = functools.partial(jnp.einsum, "bmk,bkj->bmj")
  gram = jnp.einsum("bmn,bkn->bmk", x, x)
  identity = jnp.eye(x.shape[1], dtype=x.dtype)
  q = None
  for k in range(steps):
    poly = a * identity + b * gram + c * mm(gram, gram)
    q = poly if q is None else mm(poly, q)
    if k < steps - 1:
      gram = mm(mm(poly, gram), poly)
  return jnp.einsum("bmk,bkn->bmn", q, x)


def _as_batch(u: jax.Array) -> tuple[jax.Array, bool]:
  """``[in, out]`` or ``[E, in, out]`` as ``[b, m, n]`` with m <= n (and whether it was transposed)."""
  v = u[None] if u.ndim == 2 else u
  if v.shape[1] > v.shape[2]:
    return jnp.swapaxes(v, 1, 2), True
  return v, False


def orthogonalize(updates, steps: int):
  """Newton-Schulz-orthogonalised, RMS-matched updates; same-shaped matrices share one batched call."""
  leaves, treedef = jax.tree.flatten(updates)
  views = [_as_batch(u) for u in leaves]
  groups: dict[tuple[int, int], list[int]] = {}
  for i, (v, _) in enumerate(views):
    groups.setdefault(v.shape[1:], []).append(i)
  out = [None] * len(leaves)
  for (m, n), idx in groups.items():
    ortho = newton_schulz(jnp.concatenate([views[i][0] for i in idx]), steps)
    ortho = ortho * (MATCHED_RMS * np.sqrt(max(m, n)))
    offsets = np.cumsum([0] + [views[i][0].shape[0] for i in idx])
    for i, lo, hi in zip(idx, offsets[:-1], offsets[1:]):
      part = ortho[lo:hi]
      part = jnp.swapaxes(part, 1, 2) if views[i][1] else part
      out[i] = part.reshape(leaves[i].shape).astype(leaves[i].dtype)
  return jax.tree.unflatten(treedef, out)


class MuonState(NamedTuple):
  """Momentum per Muon parameter (mirrors the parameters)."""

  mu: optax.Updates


def scale_by_muon(beta: float = 0.95, ns_steps: int = 5) -> optax.GradientTransformation:
  """Nesterov momentum, then Newton-Schulz orthogonalisation of each matrix (RMS-matched)."""

  def init(params):
    return MuonState(mu=jax.tree.map(jnp.zeros_like, params))

  def update(updates, state, params=None):
    del params
    mu = jax.tree.map(lambda m, g: beta * m + g, state.mu, updates)
    nesterov = jax.tree.map(lambda m, g: beta * m + g, mu, updates)
    return orthogonalize(nesterov, ns_steps), MuonState(mu=mu)

  return optax.GradientTransformation(init, update)


def param_labels(params, experts: bool = True) -> dict:
  """``"muon"`` for hidden matrices, else ``"adamw"``.

  Hidden matrices: 2-D kernels inside DiT blocks and text-encoder layers
  (not the router's), and, if ``experts``, the stacked expert matrices.
  """

  def label(path, x):
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    hidden = ("blocks" in keys or "layers" in keys) and "router" not in keys
    matrix = (keys[-1] == "kernel" and x.ndim == 2) or (experts and keys[-1] in ("wi", "wo") and x.ndim == 3)
    return "muon" if hidden and matrix else "adamw"

  return jax.tree_util.tree_map_with_path(label, params)


def muon_adamw(schedule, adamw: optax.GradientTransformation, *, beta: float, ns_steps: int, experts: bool,
               weight_decay: float) -> optax.GradientTransformation:
  """Muon on :func:`param_labels`' hidden matrices, the given ``adamw`` on the rest; one schedule for both."""
  muon = optax.chain(scale_by_muon(beta, ns_steps), optax.add_decayed_weights(weight_decay),
                     optax.scale_by_learning_rate(schedule))
  return optax.partition({"muon": muon, "adamw": adamw}, functools.partial(param_labels, experts=experts))
