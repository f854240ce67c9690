"""Grouped matmuls for dropless token choice: N rows sorted by expert, each row times its expert's weights.

Letters: n rows (sorted by expert; `group_sizes[e]` rows for expert e), e
experts, m tiles, t rows per tile, d input width, h output width.

Two implementations of y[n] = x[n] @ w[expert(n)]:

  ragged_dot  `jax.lax.ragged_dot`. On TPU it is the Mosaic grouped-matmul
              kernel and costs what the rows cost. Elsewhere XLA rewrites it
              as a dense dot of every row with every expert plus a mask (XLA's
              RaggedDotRewriter; newer CUDA builds send the forward and input
              gradient to cuDNN but still the weight gradient to the dense
              form), so a top-k-of-E layer does E/k times its work.
  tiles       Each expert's rows are padded up to a multiple of a tile of t
              rows, so every tile belongs to one expert; a static count of
              m = (n + e*(t-1)) // t tiles covers any group sizes. A `lax.scan`
              over tiles multiplies each used tile by its expert's weights
              (sliced, never gathered per tile) and skips unused tiles with
              `lax.cond`. Its `custom_vjp` backward is a second scan that
              writes each tile's dW into its expert's slice of one float32
              accumulator, so nothing of size [e, d, h] is built per tile.
              Cost: the routed rows plus at most t-1 padding rows per expert.
              With experts sharded over devices the scan reads every expert's
              weights, so XLA gathers them: correct, but not expert-parallel.

`impl="auto"` (`resolve_impl`) picks ragged_dot on TPU and tiles on every other
backend. Usage (`ec_dit.moe.layers.Experts.ragged`):

    plan = tile_plan(group_sizes, n, tile_size(n, e))
    x_mtd = to_tiles(x_nd, plan)
    y_mth = tile_matmul(x_mtd, w_edh, plan)    # + bias_edh[plan.tile_expert][:, None]
    y_nh = from_tiles(y_mth, plan)
"""

from __future__ import annotations

from typing import NamedTuple

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

  Padding costs up to t-1 rows per expert, about e*t/2 rows on average, so
  t <= n/(4e) keeps it near n/8 (12%); tiles much smaller than that pay more
  per-tile loop overhead than they save. Measured on this 2-core CPU
  (experiments/benchmark_dropless.py, fwd+bwd, medians of paired ratios): at
  n = 4096, e = 8, t = 128 and 256 were within noise of each other over three
  runs and 32 and 64 about 25% slower; at n = 256, e = 4, t = 16 beat 32 and 64.
  """
  target = max(1, num_rows // (4 * num_experts))
  return int(min(MAX_TILE, max(MIN_TILE, 1 << (target.bit_length() - 1))))


class TilePlan(NamedTuple):
  """Where each sorted row goes in the tiled layout [m, t, ...].

  tile_expert [m] int32: the expert of each tile (the last expert for unused tiles).
  tile_used [m] bool: the tile holds at least one row.
  slot_of_row [n] int32: the row's position in the flattened tiles (m*t past the end for
    rows beyond sum(group_sizes), which are dropped and come back as 0, as in ragged_dot).
  tile: t, static.
  """
  tile_expert: jax.Array
  tile_used: jax.Array
  slot_of_row: jax.Array
  tile: int

  @property
  def num_tiles(self) -> int:
    return self.tile_expert.shape[0]


def num_tiles(num_rows: int, num_experts: int, tile: int) -> int:
  """m = (n + e*(t-1)) // t >= sum_e ceil(group_sizes[e] / t) for any group sizes summing to <= n."""
  return (num_rows + num_experts * (tile - 1)) // tile


def tile_plan(group_sizes: jax.Array, num_rows: int, tile: int) -> TilePlan:
  """The tiled layout of n rows sorted by expert with `group_sizes` [e] rows per expert."""
  e = group_sizes.shape[0]
  m = num_tiles(num_rows, e, tile)
  group_sizes = group_sizes.astype(jnp.int32)
  tiles_e = (group_sizes + tile - 1) // tile
  tile_end_e = jnp.cumsum(tiles_e)
  row_end_e = jnp.cumsum(group_sizes)
  tile_m = jnp.arange(m, dtype=jnp.int32)
  tile_expert = jnp.minimum(jnp.searchsorted(tile_end_e, tile_m, side="right"), e - 1).astype(jnp.int32)
  row_n = jnp.arange(num_rows, dtype=jnp.int32)
  expert_n = jnp.searchsorted(row_end_e, row_n, side="right")
  valid_n = expert_n < e
  expert_n = jnp.minimum(expert_n, e - 1)
  first_tile_n = (tile_end_e - tiles_e)[expert_n]
  rank_n = row_n - (row_end_e - group_sizes)[expert_n]
  slot_n = jnp.where(valid_n, first_tile_n * tile + rank_n, m * tile).astype(jnp.int32)
  return TilePlan(tile_expert, tile_m < tile_end_e[-1], slot_n, tile)


def to_tiles(x_nd: jax.Array, plan: TilePlan) -> jax.Array:
  """[n, d] sorted rows -> [m, t, d]; padding rows are 0."""
  m, t = plan.num_tiles, plan.tile
  x_pd = jnp.zeros((m * t,) + x_nd.shape[1:], x_nd.dtype)
  x_pd = x_pd.at[plan.slot_of_row].set(x_nd, indices_are_sorted=True, mode="drop")
  return x_pd.reshape((m, t) + x_nd.shape[1:])


def from_tiles(y_mth: jax.Array, plan: TilePlan) -> jax.Array:
  """[m, t, h] -> [n, h] in the sorted row order (0 for rows beyond sum(group_sizes))."""
  y_ph = y_mth.reshape((-1,) + y_mth.shape[2:])
  return y_ph.at[plan.slot_of_row].get(indices_are_sorted=True, mode="fill", fill_value=0)


def tile_matmul(x_mtd: jax.Array, w_edh: jax.Array, plan: TilePlan) -> jax.Array:
  """y[m] = x[m] @ w[tile_expert[m]] for used tiles, 0 for unused: [m, t, d] x [e, d, h] -> [m, t, h]."""
  return _tile_matmul(x_mtd, w_edh, plan.tile_expert, plan.tile_used)


@jax.custom_vjp
def _tile_matmul(x_mtd, w_edh, tile_expert, tile_used):
  return _tile_matmul_fwd(x_mtd, w_edh, tile_expert, tile_used)[0]


def _tile_matmul_fwd(x_mtd, w_edh, tile_expert, tile_used):
  t, h = x_mtd.shape[1], w_edh.shape[2]

  def tile_fn(_, tile):
    x_td, e, used = tile
    y_th = lax.cond(used,
                    lambda: jnp.einsum("td,dh->th", x_td, lax.dynamic_index_in_dim(w_edh, e, 0, keepdims=False)),
                    lambda: jnp.zeros((t, h), x_td.dtype))
    return None, y_th

  _, y_mth = lax.scan(tile_fn, None, (x_mtd, tile_expert, tile_used))
  return y_mth, (x_mtd, w_edh, tile_expert, tile_used)


def _tile_matmul_bwd(residuals, dy_mth):
  """dx[m] = dy[m] @ w[e]^T; dw[e] += x[m]^T @ dy[m], accumulated in float32 in place."""
  x_mtd, w_edh, tile_expert, tile_used = residuals

  def tile_fn(dw_edh, tile):
    x_td, dy_th, e, used = tile

    def run(dw_edh):
      w_dh = lax.dynamic_index_in_dim(w_edh, e, 0, keepdims=False)
      dw_dh = lax.dynamic_index_in_dim(dw_edh, e, 0, keepdims=False)
      dw_dh = dw_dh + jnp.einsum("td,th->dh", x_td, dy_th, preferred_element_type=jnp.float32)
      dx_td = jnp.einsum("th,dh->td", dy_th, w_dh).astype(x_td.dtype)
      return lax.dynamic_update_index_in_dim(dw_edh, dw_dh, e, 0), dx_td

    return lax.cond(used, run, lambda dw_edh: (dw_edh, jnp.zeros_like(x_td)), dw_edh)

  dw_edh, dx_mtd = lax.scan(tile_fn, jnp.zeros(w_edh.shape, jnp.float32), (x_mtd, dy_mth, tile_expert, tile_used))
  return dx_mtd, dw_edh.astype(w_edh.dtype), None, None


_tile_matmul.defvjp(_tile_matmul_fwd, _tile_matmul_bwd)
