"""Grouped matmuls for dropless token choice: N rows sorted by expert, each row through its own expert.

Letters: n rows (sorted by expert; `group_sizes[e]` rows for expert e), e
experts, t rows per tile, d input width, h output width.

Two implementations of y[n] = MLP_{expert(n)}(x[n]), the expert MLP of each row:

  ragged_dot  `jax.lax.ragged_dot` for each of the MLP's matmuls. On TPU it is the Mosaic grouped-matmul
              kernel and costs what the rows cost. Elsewhere XLA rewrites it
              as a dense dot of every row with every expert plus a mask (XLA's
              RaggedDotRewriter; newer CUDA builds send the forward and input
              gradient to cuDNN but still the weight gradient to the dense
              form), so a top-k-of-E layer does E/k times its work.
  tiles       A loop over experts, in order; for each, a loop over its rows in
              tiles read straight from the sorted rows (no padded copy, no
              scatter into a tiled layout, no gather back): as many tiles of
              the largest size as fit, then at most one of each smaller size
              (each half the last), then one tile of the smallest size t for
              what is left (`tile_sizes`, `_expert_tiles`). Only that last tile
              overruns the expert's rows, by at most t-1 (into the next
              experts' rows, or t rows of zeros appended at the end); what it
              writes there is overwritten when the next expert's tiles run.
              Each expert's weights are sliced once, not once per tile, and the
              trip counts are the real tile counts (nothing runs for an empty
              expert). `tile_mlp` (what `ec_dit.moe.layers.Experts.ragged`
              runs) does all three matmuls of a (SwiGLU or GELU) expert MLP on
              a tile in one loop body, keeping the pre-activations for the
              backward. The `custom_vjp` backward is the same loop: the whole
              MLP's gradient of a tile per body, dx tile by tile, and each
              expert's weight gradients summed in float32 over its tiles
              (overrun rows masked out) and written once into its slice of dW.
              Cost: the routed rows plus fewer than t rows per expert.
              With experts sharded over devices the loop reads every expert's
              weights, so XLA gathers them: correct, but not expert-parallel.

Why this shape: a first version padded each expert's rows into a [m, t, d]
tiled layout and ran, per matmul, one `lax.scan` over all tiles with `lax.cond`
skipping unused ones. Its tile matmuls ran at about expert choice's rate, but
per tile it also copied the tile's expert weights out of the stack (XLA
materialises a dynamic slice feeding a dot), read, added and wrote back that
expert's slice of an [e, d, h] dW accumulator, and paid loop and copy
overhead; around each MLP it zero-filled and scattered into tiles and gathered
back; and it computed padding rows. Looping over experts, reading rows in
place, mixing big and small tiles and fusing the MLP removed that overhead
(the profile and the step times: docs/benchmarks.md, "Dropless tiles").

`impl="auto"` (`resolve_impl`) picks ragged_dot on TPU and tiles on every other
backend. Usage:

    tiles = tile_sizes(n, e)
    y_nd = tile_mlp(x_nd, group_sizes, tiles, {"wi": wi, "wg": wg, "wo": wo, "bi": None, "bo": None},
                    lambda u, g: jax.nn.silu(g) * u)
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
  [8, 1024]. These sizes beat a single size (more loop trips and per-tile dW
  additions, smaller matmuls) and a smallest tile twice as large (twice the
  overrun): docs/benchmarks.md, "Dropless tiles".
  """
  def pow2_at_most(x):
    return int(min(MAX_TILE, max(MIN_TILE, 1 << (max(1, x).bit_length() - 1))))

  return halvings(pow2_at_most(num_rows // num_experts), pow2_at_most(num_rows // (8 * num_experts)))


def halvings(big: int, small: int) -> tuple[int, ...]:
  """Tile sizes big, big/2, ..., down to small (powers of two): a `tiles` argument of `tile_mlp`."""
  return tuple(big >> k for k in range((big // small).bit_length()))


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


def tile_mlp(x_nd: jax.Array, group_sizes: jax.Array, tiles, params: dict, activation) -> jax.Array:
  """Each row through its expert's MLP, for n rows sorted by expert: [n, d] -> [n, d].

  y = activation(x @ wi[e] + bi[e], x @ wg[e]) @ wo[e] + bo[e], with params
  {"wi", "wg", "wo", "bi", "bo"} stacked over experts ("wg", "bi", "bo" may be
  None; `activation(u, g)` gets g = None then). One loop over the tiles does all
  three matmuls of a tile (the tile's [t, h] hidden activations stay in cache;
  u and g are kept for the backward), and its backward is one loop too.
  """
  sizes = _sizes(tiles, x_nd.shape[0])
  return _tile_mlp(x_nd, group_sizes.astype(jnp.int32), params, sizes, activation)


def _expert_params(params, e):
  return {k: None if p is None else lax.dynamic_index_in_dim(p, e, 0, keepdims=False) for k, p in params.items()}


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _tile_mlp(x_nd, group_sizes, params, sizes, activation):
  return _tile_mlp_fwd(x_nd, group_sizes, params, sizes, activation)[0]


def _tile_mlp_fwd(x_nd, group_sizes, params, sizes, activation):
  n, d = x_nd.shape
  h = params["wi"].shape[2]
  x_pd = _pad(x_nd, sizes)
  gated = params["wg"] is not None

  def expert(e, start, end, carry):
    p = _expert_params(params, e)

    def tile_fn(r, t, carry):
      y_pd, u_ph, g_ph = carry
      x_td = lax.dynamic_slice_in_dim(x_pd, r, t)
      u_th = jnp.dot(x_td, p["wi"])
      if p["bi"] is not None:
        u_th = u_th + p["bi"]
      g_th = jnp.dot(x_td, p["wg"]) if gated else None
      y_td = jnp.dot(activation(u_th, g_th), p["wo"])
      if p["bo"] is not None:
        y_td = y_td + p["bo"]
      y_pd = lax.dynamic_update_slice_in_dim(y_pd, y_td.astype(y_pd.dtype), r, 0)
      u_ph = lax.dynamic_update_slice_in_dim(u_ph, u_th, r, 0)
      if gated:
        g_ph = lax.dynamic_update_slice_in_dim(g_ph, g_th, r, 0)
      return y_pd, u_ph, g_ph

    return _expert_tiles(start, end, sizes, tile_fn, carry)

  zeros = lambda w: jnp.zeros((n + sizes[-1], w), x_nd.dtype)  # noqa: E731
  y_pd, u_ph, g_ph = _over_experts(group_sizes, expert, (zeros(d), zeros(h), zeros(h) if gated else None))
  y_nd = jnp.where(_rows_before(n, jnp.sum(group_sizes)), y_pd[:n], 0)
  return y_nd, (x_nd, group_sizes, params, u_ph, g_ph)


def _tile_mlp_bwd(sizes, activation, residuals, dy_nd):
  x_nd, group_sizes, params, u_ph, g_ph = residuals
  n, d = x_nd.shape
  x_pd = _pad(x_nd, sizes)
  dy_pd = _pad(jnp.where(_rows_before(n, jnp.sum(group_sizes)), dy_nd, 0), sizes)
  gated = params["wg"] is not None
  f32 = lambda p: None if p is None else jnp.zeros(p.shape[1:], jnp.float32)  # noqa: E731

  def expert(e, start, end, carry):
    dx_pd, grads = carry
    p = _expert_params(params, e)

    def tile_fn(r, t, carry):
      dx_pd, acc = carry
      x_td = lax.dynamic_slice_in_dim(x_pd, r, t)
      # rows past `end` belong to the next expert: with their dy zeroed every
      # gradient below gets nothing from them (and their dx, written now, is overwritten next)
      mine = (r + jnp.arange(t) < end)[:, None]
      dy_td = jnp.where(mine, lax.dynamic_slice_in_dim(dy_pd, r, t), 0)
      u_th = lax.dynamic_slice_in_dim(u_ph, r, t)
      g_th = lax.dynamic_slice_in_dim(g_ph, r, t) if gated else None
      a_th, act_vjp = jax.vjp(activation, u_th, g_th)
      dot32 = lambda spec, a, b: jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)  # noqa: E731
      acc = dict(acc)
      acc["wo"] = acc["wo"] + dot32("th,td->hd", a_th, dy_td)
      if acc["bo"] is not None:
        acc["bo"] = acc["bo"] + jnp.sum(dy_td, axis=0, dtype=jnp.float32)
      du_th, dg_th = act_vjp(jnp.einsum("td,hd->th", dy_td, p["wo"]))
      acc["wi"] = acc["wi"] + dot32("td,th->dh", x_td, du_th)
      if acc["bi"] is not None:
        acc["bi"] = acc["bi"] + jnp.sum(du_th, axis=0, dtype=jnp.float32)
      dx_td = jnp.einsum("th,dh->td", du_th, p["wi"])
      if gated:
        acc["wg"] = acc["wg"] + dot32("td,th->dh", x_td, dg_th)
        dx_td = dx_td + jnp.einsum("th,dh->td", dg_th, p["wg"])
      return lax.dynamic_update_slice_in_dim(dx_pd, dx_td.astype(dx_pd.dtype), r, 0), acc

    dx_pd, acc = _expert_tiles(start, end, sizes, tile_fn, (dx_pd, {k: f32(v) for k, v in params.items()}))
    grads = {k: None if g is None else lax.dynamic_update_index_in_dim(g, acc[k].astype(g.dtype), e, 0)
             for k, g in grads.items()}
    return dx_pd, grads

  grads0 = {k: None if p is None else jnp.zeros_like(p) for k, p in params.items()}
  dx_pd, grads = _over_experts(group_sizes, expert, (jnp.zeros((n + sizes[-1], d), x_nd.dtype), grads0))
  return dx_pd[:n], None, grads


_tile_mlp.defvjp(_tile_mlp_fwd, _tile_mlp_bwd)
