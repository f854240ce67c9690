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
              in tiles read straight from the sorted rows (no padded copy, no
              scatter into a tiled layout and no gather back): as many tiles of
              the largest size as fit, then at most one of each smaller size
              (each half the last), then one of the smallest size for what is
              left (`tile_sizes`, `_expert_tiles`). That last tile reads up to
              t-1 rows past the expert's segment (the next experts' rows, or t
              rows of zeros appended at the end); its outputs there are wrong
              and are overwritten when the next expert's tiles run, as the loop
              goes in expert order. Each expert's weights are sliced once (not
              once per tile), and the trip counts are the real tile counts, so
              nothing runs for empty experts. Its `custom_vjp` backward is the
              same loop: dx tile by tile (the spill again overwritten), dW of
              one expert summed in a float32 [d, h] carried over its tiles,
              with the rows past its segment masked out, then written once
              into dW[e].
              Cost: the routed rows plus fewer than t rows per expert (t the
              smallest tile).
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

    y_nh = tile_matmul(x_nd, w_edh, group_sizes, tile_sizes(n, e))
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ec_dit.schema.defaults import DROPLESS_IMPLS

MIN_TILE, MAX_TILE = 8, 1024


def resolve_impl(impl: str, backend: str | None = None) -> str:
  """"auto" -> "ragged_dot" on TPU (a grouped-matmul kernel), "tiles" elsewhere; other names pass through."""
  if impl not in DROPLESS_IMPLS:
    raise ValueError(f"dropless_impl: must be one of {DROPLESS_IMPLS}, got {impl!r}")
  if impl != "auto":
    return impl
  return "ragged_dot" if (backend or jax.default_backend()) == "tpu" else "tiles"


def tile_sizes(num_rows: int, num_experts: int) -> tuple[int, ...]:
  """Rows per tile, largest first: powers of two from about n/e down to about n/(8e), each half the last.

  An expert's rows go in as many of the largest tiles as fit, then at most one
  of each smaller size (`_expert_tiles`), so most rows run in big matmuls while
  the rows computed for nothing (the last tile's overrun) stay below the
  smallest tile: about e*t/2 rows on average, n/16 (6%) at t = n/(8e). Within
  [8, 1024]. Measured on this 2-core CPU at DiT-MoE-S/2 (n = 4096, e = 8,
  experiments/benchmark_dropless.py and the S/2 train step): (512, 256, 128, 64)
  beat a single size of 128 or 64 (more loop trips, more per-tile dW
  accumulation, smaller matmuls) and a smallest tile of 128 (twice the overrun).
  """
  def pow2_at_most(x):
    return int(min(MAX_TILE, max(MIN_TILE, 1 << (max(1, x).bit_length() - 1))))

  small, big = pow2_at_most(num_rows // (8 * num_experts)), pow2_at_most(num_rows // num_experts)
  return tuple(big >> k for k in range((big // small).bit_length()))


def tile_matmul(x_nd: jax.Array, w_edh: jax.Array, group_sizes: jax.Array, tiles) -> jax.Array:
  """y[n] = x[n] @ w[expert(n)] for n rows sorted by expert: [n, d] x [e, d, h] -> [n, h].

  `tiles`: rows per tile, or a tuple of tile sizes each half the last (`tile_sizes`;
  see `_expert_tiles`). Rows past sum(group_sizes) come back as 0 (and get no
  gradient), as in ragged_dot.
  """
  return _tile_matmul(x_nd, w_edh, group_sizes.astype(jnp.int32), _sizes(tiles, x_nd.shape[0]))


def _sizes(tiles, num_rows):
  sizes = (tiles,) if isinstance(tiles, int) else tuple(tiles)
  if any(a != 2 * b for a, b in zip(sizes, sizes[1:])):
    raise ValueError(f"tile sizes must each be half the last, got {sizes}")
  return tuple(t for t in sizes[:-1] if t <= num_rows) + sizes[-1:]  # none bigger than all the rows


def _rows_before(num_rows, end):
  """[n, 1] bool: row < end."""
  return (jnp.arange(num_rows) < end)[:, None]


def _pad(a, sizes):
  """Rows of zeros appended, so that a last tile starting at any row < n stays in bounds (no clamping)."""
  return jnp.pad(a, ((0, sizes[-1]), (0, 0)))


def _expert_tiles(start, end, sizes, tile_fn, carry):
  """`carry = tile_fn(r, t, carry)` on each tile of one expert's rows [start, end); returns the carry.

  The rows are cut into as many tiles of sizes[0] rows as fit, then at most one
  tile of each next size (each half the last, so what is left is then below
  sizes[-1]), then, if rows remain, one more tile of sizes[-1] rows which runs
  past `end`. A tile starts at row r and has t rows (static).
  """
  big = sizes[0]
  full = (end - start) // big
  carry = lax.fori_loop(0, full, lambda i, c: tile_fn(start + i * big, big, c), carry)
  r = start + full * big
  for t in sizes[1:]:
    carry, r = lax.cond(end - r >= t, lambda c, r, t=t: (tile_fn(r, t, c), r + t), lambda c, r: (c, r), carry, r)
  return lax.cond(end > r, lambda c: tile_fn(r, sizes[-1], c), lambda c: c, carry)


def _over_experts(group_sizes, expert_fn, carry):
  """`carry = expert_fn(e, start, end, carry)` for e = 0, 1, ... (in order: a tile's spill is overwritten next)."""
  ends = jnp.cumsum(group_sizes)
  starts = ends - group_sizes
  return lax.fori_loop(0, group_sizes.shape[0], lambda e, c: expert_fn(e, starts[e], ends[e], c), carry)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tile_matmul(x_nd, w_edh, group_sizes, sizes):
  return _tile_matmul_fwd(x_nd, w_edh, group_sizes, sizes)[0]


def _tile_matmul_fwd(x_nd, w_edh, group_sizes, sizes):
  n = x_nd.shape[0]
  x_pd = _pad(x_nd, sizes)

  def expert(e, start, end, y_ph):
    w_dh = lax.dynamic_index_in_dim(w_edh, e, 0, keepdims=False)  # one copy per expert

    def tile_fn(r, t, y_ph):
      y_th = jnp.dot(lax.dynamic_slice_in_dim(x_pd, r, t), w_dh)
      return lax.dynamic_update_slice_in_dim(y_ph, y_th.astype(y_ph.dtype), r, 0)

    return _expert_tiles(start, end, sizes, tile_fn, y_ph)

  y_ph = _over_experts(group_sizes, expert, jnp.zeros((n + sizes[-1], w_edh.shape[2]), x_nd.dtype))
  return jnp.where(_rows_before(n, jnp.sum(group_sizes)), y_ph[:n], 0), (x_nd, w_edh, group_sizes)


def _tile_matmul_bwd(sizes, residuals, dy_nh):
  """dx[n] = dy[n] @ w[e]^T; dw[e] = sum over e's rows of x[n]^T dy[n], in float32 over one expert's tiles."""
  x_nd, w_edh, group_sizes = residuals
  (n, d), h = x_nd.shape, w_edh.shape[2]
  x_pd = _pad(x_nd, sizes)
  dy_ph = _pad(jnp.where(_rows_before(n, jnp.sum(group_sizes)), dy_nh, 0), sizes)
  mask_x = d <= h  # mask the narrower operand of the dW product

  def expert(e, start, end, carry):
    dx_pd, dw_edh = carry
    w_dh = lax.dynamic_index_in_dim(w_edh, e, 0, keepdims=False)

    def tile_fn(r, t, carry):
      dx_pd, dw_dh = carry
      x_td, dy_th = lax.dynamic_slice_in_dim(x_pd, r, t), lax.dynamic_slice_in_dim(dy_ph, r, t)
      dx_td = jnp.einsum("th,dh->td", dy_th, w_dh)
      mine = (r + jnp.arange(t) < end)[:, None]  # rows of this expert (the rest belong to the next)
      if mask_x:
        x_td = jnp.where(mine, x_td, 0)
      else:
        dy_th = jnp.where(mine, dy_th, 0)
      dw_dh = dw_dh + jnp.einsum("td,th->dh", x_td, dy_th, preferred_element_type=jnp.float32)
      return lax.dynamic_update_slice_in_dim(dx_pd, dx_td.astype(dx_pd.dtype), r, 0), dw_dh

    dx_pd, dw_dh = _expert_tiles(start, end, sizes, tile_fn, (dx_pd, jnp.zeros((d, h), jnp.float32)))
    return dx_pd, lax.dynamic_update_index_in_dim(dw_edh, dw_dh.astype(dw_edh.dtype), e, 0)

  dx_pd, dw_edh = _over_experts(group_sizes, expert, (jnp.zeros((n + sizes[-1], d), x_nd.dtype), jnp.zeros_like(w_edh)))
  return dx_pd[:n], dw_edh, None


_tile_matmul.defvjp(_tile_matmul_fwd, _tile_matmul_bwd)

