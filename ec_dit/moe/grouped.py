"""Grouped matmuls for dropless token choice: N rows sorted by expert, each row times its expert's weights.

Letters: n rows (sorted by expert; `group_sizes[e]` rows for expert e), e
experts, t rows per tile, d input width, h output width.

Two implementations of y[n] = x[n] @ w[expert(n)]:

  ragged_dot  `jax.lax.ragged_dot`. On TPU it is the Mosaic grouped-matmul
              kernel and costs what the rows cost. Elsewhere XLA rewrites it
              as a dense dot of every row with every expert plus a mask (XLA's
              RaggedDotRewriter; newer CUDA builds send the forward and input
              gradient to cuDNN but still the weight gradient to the dense
              form), so a top-k-of-E layer does E/k times its work.
  tiles       `tile_matmul`: a loop over experts; for each, a loop over its rows
              in tiles of t rows, read straight from the sorted rows (no padded
              copy, no scatter into a tiled layout and no gather back). An
              expert's last tile reads up to t-1 rows past its segment (the next
              experts' rows, or t rows of zeros appended at the end); those
              outputs are wrong for the rows they land on and are overwritten
              when the next expert's tiles run, as the loop goes in expert order.
              Each expert's weights are sliced once (not once per tile), and the
              trip counts are the real tile counts, so nothing runs for empty
              experts. Its `custom_vjp` backward is the same loop: dx tile by
              tile (the spill again overwritten), dW of one expert summed in a
              float32 [d, h] carried over its tiles, with the rows past its
              segment masked out, then written once into dW[e].
              Cost: the routed rows plus at most t-1 rows per expert.
              With experts sharded over devices the loop reads every expert's
              weights, so XLA gathers them: correct, but not expert-parallel.

Why this shape (DiT-MoE-S/2 train step on a 2-core CPU, jax.profiler; see
docs/benchmarks.md): an earlier version padded each expert's rows into a
[m, t, d] tiled layout and ran one `lax.scan` over all m tiles with `lax.cond`
skipping unused ones. Its tile matmuls ran at the rate of expert choice's
batched ones; what it paid on top was per tile: a [d, h] copy of the tile's
expert weights (the dynamic slice feeding the dot is materialised), a read,
add and write of that expert's slice of the [e, d, h] dW accumulator, and the
loop's own copies; plus zero-filling and scattering into tiles and gathering
back, around each SwiGLU.

`impl="auto"` (`resolve_impl`) picks ragged_dot on TPU and tiles on every other
backend. Usage (`ec_dit.moe.layers.Experts.ragged`):

    y_nh = tile_matmul(x_nd, w_edh, group_sizes, tile_size(n, e))
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ec_dit.schema.defaults import DROPLESS_IMPLS

MIN_TILE, MAX_TILE = 8, 256


def resolve_impl(impl: str, backend: str | None = None) -> str:
  """"auto" -> "ragged_dot" on TPU (a grouped-matmul kernel), "tiles" elsewhere; other names pass through."""
  if impl not in DROPLESS_IMPLS:
    raise ValueError(f"dropless_impl: must be one of {DROPLESS_IMPLS}, got {impl!r}")
  if impl != "auto":
    return impl
  return "ragged_dot" if (backend or jax.default_backend()) == "tpu" else "tiles"


def tile_size(num_rows: int, num_experts: int) -> int:
  """Rows per tile: the largest power of two <= n / (4e), within [8, 256].

  An expert's last tile computes up to t-1 rows it throws away, about e*t/2
  rows on average, so t <= n/(4e) keeps that near n/8 (12%); much smaller
  tiles pay more per-tile loop overhead than they save.
  """
  target = max(1, num_rows // (4 * num_experts))
  return int(min(MAX_TILE, max(MIN_TILE, 1 << (target.bit_length() - 1))))


def tile_matmul(x_nd: jax.Array, w_edh: jax.Array, group_sizes: jax.Array, tile: int) -> jax.Array:
  """y[n] = x[n] @ w[expert(n)] for n rows sorted by expert: [n, d] x [e, d, h] -> [n, h].

  Rows past sum(group_sizes) come back as 0 (and get no gradient), as in ragged_dot.
  """
  return _tile_matmul(x_nd, w_edh, group_sizes.astype(jnp.int32), tile)


def _segments(group_sizes):
  ends = jnp.cumsum(group_sizes)
  return ends - group_sizes, ends


def _rows_before(num_rows, end):
  """[n, 1] bool: row < end."""
  return (jnp.arange(num_rows) < end)[:, None]


def _pad(a, tile):
  """t rows of zeros appended, so that a tile starting at any row < n stays in bounds (no clamping)."""
  return jnp.pad(a, ((0, tile), (0, 0)))


def _over_experts(group_sizes, tile, body, carry):
  """for e in experts: carry = body(e, first row, end row, number of tiles, carry)."""
  starts, ends = _segments(group_sizes)

  def expert(e, carry):
    return body(e, starts[e], ends[e], (group_sizes[e] + tile - 1) // tile, carry)

  return lax.fori_loop(0, group_sizes.shape[0], expert, carry)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tile_matmul(x_nd, w_edh, group_sizes, tile):
  return _tile_matmul_fwd(x_nd, w_edh, group_sizes, tile)[0]


def _tile_matmul_fwd(x_nd, w_edh, group_sizes, tile):
  n = x_nd.shape[0]
  x_pd = _pad(x_nd, tile)

  def expert(e, start, _, tiles, y_ph):
    w_dh = lax.dynamic_index_in_dim(w_edh, e, 0, keepdims=False)  # one copy per expert

    def tile_fn(i, y_ph):
      r = start + i * tile
      y_th = jnp.dot(lax.dynamic_slice_in_dim(x_pd, r, tile), w_dh)
      return lax.dynamic_update_slice_in_dim(y_ph, y_th.astype(y_ph.dtype), r, 0)

    return lax.fori_loop(0, tiles, tile_fn, y_ph)

  y_ph = _over_experts(group_sizes, tile, expert, jnp.zeros((n + tile, w_edh.shape[2]), x_nd.dtype))
  total = jnp.sum(group_sizes)
  return jnp.where(_rows_before(n, total), y_ph[:n], 0), (x_nd, w_edh, group_sizes)


def _tile_matmul_bwd(tile, residuals, dy_nh):
  """dx[n] = dy[n] @ w[e]^T; dw[e] = sum over e's rows of x[n]^T dy[n], in float32 over one expert's tiles."""
  x_nd, w_edh, group_sizes = residuals
  (n, d), h = x_nd.shape, w_edh.shape[2]
  x_pd = _pad(x_nd, tile)
  dy_ph = _pad(jnp.where(_rows_before(n, jnp.sum(group_sizes)), dy_nh, 0), tile)
  mask_x = d <= h  # mask the narrower operand of the dW product

  def expert(e, start, end, tiles, carry):
    w_dh = lax.dynamic_index_in_dim(w_edh, e, 0, keepdims=False)

    def tile_fn(i, carry):
      dx_pd, dw_dh = carry
      r = start + i * tile
      x_td, dy_th = lax.dynamic_slice_in_dim(x_pd, r, tile), lax.dynamic_slice_in_dim(dy_ph, r, tile)
      dx_td = jnp.einsum("th,dh->td", dy_th, w_dh)
      mine = (r + jnp.arange(tile) < end)[:, None]  # rows of this expert (the rest belong to the next)
      if mask_x:
        x_td = jnp.where(mine, x_td, 0)
      else:
        dy_th = jnp.where(mine, dy_th, 0)
      dw_dh = dw_dh + jnp.einsum("td,th->dh", x_td, dy_th, preferred_element_type=jnp.float32)
      return lax.dynamic_update_slice_in_dim(dx_pd, dx_td.astype(dx_pd.dtype), r, 0), dw_dh

    dx_pd, dw_edh = carry
    dx_pd, dw_dh = lax.fori_loop(0, tiles, tile_fn, (dx_pd, jnp.zeros((d, h), jnp.float32)))
    return dx_pd, lax.dynamic_update_index_in_dim(dw_edh, dw_dh.astype(dw_edh.dtype), e, 0)

  dx_pd, dw_edh = _over_experts(group_sizes, tile, expert,
                                (jnp.zeros((n + tile, d), x_nd.dtype), jnp.zeros_like(w_edh)))
  return dx_pd[:n], dw_edh, None


_tile_matmul.defvjp(_tile_matmul_fwd, _tile_matmul_bwd)
