"""Grouped matmul over row tiles in plain XLA (a loop of small matmuls), with a custom VJP.

Rows come in tiles of equal size, and every tile belongs to one group (the `blocked` MoE dispatch
pads each expert's rows to whole tiles):

  tiled_gmm: out[t*tile:(t+1)*tile] = lhs[t*tile:(t+1)*tile] @ rhs[tile_group[t]]   for t < num_used
             (rows of the tiles from `num_used` on come out zero)           [T*tile, K] -> [T*tile, N]

One `fori_loop` step per used tile indexes its group's weight in place (no gathered copy of the
weights); the tiles past the used ones (a static bound's slack) cost nothing. The VJP loops the
same way and accumulates the weight gradient per group in float32. This is the fast grouped
matmul on the CPU, where `jax.lax.ragged_dot` lowers to a masked dense product.

Legend: T tiles, tile rows per tile, K contraction, N output width, E groups.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def tiled_gmm(lhs: jax.Array, rhs: jax.Array, tile_group: jax.Array,
              num_used: jax.Array) -> jax.Array:
  """lhs [T*tile, K], rhs [E, K, N], tile_group [T] int, num_used [] int (traced) -> [T*tile, N]."""
  return _tiled_fwd(lhs, rhs, tile_group, num_used)[0]


def _tile_rows(x: jax.Array, tile_group: jax.Array) -> int:
  return x.shape[0] // tile_group.shape[0]


def _tiled_fwd(lhs, rhs, tile_group, num_used):
  rows = _tile_rows(lhs, tile_group)

  def step(t, out):  # out [T*tile, N]
    a = jax.lax.dynamic_slice_in_dim(lhs, t * rows, rows)               # [tile, K]
    return jax.lax.dynamic_update_slice_in_dim(out, a @ rhs[tile_group[t]], t * rows, 0)

  out = jax.lax.fori_loop(0, num_used, step,
                          jnp.zeros((lhs.shape[0], rhs.shape[-1]), lhs.dtype))
  return out, (lhs, rhs, tile_group, num_used)


def _tiled_bwd(res, g):
  lhs, rhs, tile_group, num_used = res
  rows = _tile_rows(lhs, tile_group)

  def step(t, carry):  # d_lhs [T*tile, K], d_rhs [E, K, N] float32
    d_lhs, d_rhs = carry
    gy = jax.lax.dynamic_slice_in_dim(g, t * rows, rows)                 # [tile, N]
    x = jax.lax.dynamic_slice_in_dim(lhs, t * rows, rows)                # [tile, K]
    grp = tile_group[t]
    d_lhs = jax.lax.dynamic_update_slice_in_dim(d_lhs, gy @ rhs[grp].T, t * rows, 0)
    return d_lhs, d_rhs.at[grp].add(x.T @ gy)

  d_lhs, d_rhs = jax.lax.fori_loop(0, num_used, step, (jnp.zeros_like(lhs),
                                                        jnp.zeros(rhs.shape, jnp.float32)))
  return d_lhs, d_rhs.astype(rhs.dtype), None, None


tiled_gmm.defvjp(_tiled_fwd, _tiled_bwd)


def tiled_gmm_reference(lhs: jax.Array, rhs: jax.Array, tile_group: jax.Array,
                        num_used: jax.Array) -> jax.Array:
  """Pure-jnp twin of `tiled_gmm`: every tile's product at once, unused tiles masked to zero."""
  t = tile_group.shape[0]
  tiles = lhs.reshape(t, -1, lhs.shape[-1])                                # [T, tile, K]
  out = jnp.einsum("trk,tkn->trn", tiles, rhs[tile_group],
                   precision=jax.lax.Precision.HIGHEST)                     # [T, tile, N]
  used = (jnp.arange(t) < num_used)[:, None, None]
  return jnp.where(used, out, 0).reshape(lhs.shape[0], -1).astype(lhs.dtype)
