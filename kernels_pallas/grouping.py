"""Row groups and tile visits shared by the grouped-matmul kernels (Mosaic TPU and Triton).

Rows of `lhs` are laid out group after group: group e owns `group_sizes[e]` consecutive rows
starting at `sum(group_sizes[:e])`, cut at M. Rows are cut into m-tiles of `tm` rows; a group
boundary may fall inside a tile, so a kernel walks "visits": one (group, m-tile) pair per step,
group-major. The visit list has the static length `tiles_m + groups - 1` (the worst case); the
entries past the real count repeat the last visit.

Legend: M rows, E groups, V visits, tm rows per m-tile.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def round_up(x: int, m: int) -> int:
  return (x + m - 1) // m * m


def tile(dim: int, block: int) -> tuple[int, int]:
  """(tile size, padded dim): the whole dim when it fits in one block, else `block`-sized tiles."""
  if dim <= block:
    return dim, dim
  return block, round_up(dim, block)


def pad_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  if x.shape == shape:
    return x
  return jnp.pad(x, [(0, t - s) for s, t in zip(x.shape, shape)])


def group_bounds(group_sizes: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
  """Row range [start, end) of each group [E], cut at M."""
  ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m).astype(jnp.int32)
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
  return starts, ends


def with_tail(starts: jax.Array, ends: jax.Array, end: int) -> tuple[jax.Array, jax.Array]:
  """Bounds [E + 1] with a "tail" pseudo-group for the rows past the last group, up to `end`."""
  return (jnp.concatenate([starts, ends[-1:]]),
          jnp.concatenate([ends, jnp.full((1,), end, jnp.int32)]))


def visits(starts, ends, *, tm: int, tiles_m: int, visit_empty: bool):
  """Visit list: (group id [V], m-tile id [V], real count [1]) with V = tiles_m + G - 1 static.

  `visit_empty` gives each empty group one visit (so that a per-group output is written)."""
  g = starts.shape[0]
  sizes = ends - starts
  first = starts // tm
  last = (ends - 1) // tm
  n = jnp.where(sizes > 0, last - first + 1, 1 if visit_empty else 0)  # visits per group [G]
  first = jnp.where(sizes > 0, first, jnp.minimum(first, tiles_m - 1))
  csum = jnp.cumsum(n)  # [G]
  count = csum[-1]
  v = tiles_m + g - 1
  step = jnp.clip(jnp.arange(v, dtype=jnp.int32), 0, jnp.maximum(count - 1, 0))
  gid = jnp.searchsorted(csum, step, side="right").astype(jnp.int32)  # [V]
  gid = jnp.minimum(gid, g - 1)
  first_tile = first[gid] + step - (csum[gid] - n[gid])  # [V]
  return gid, first_tile.astype(jnp.int32), count.reshape(1).astype(jnp.int32)


def row_mask(tile_id, start, end, tm: int, width: int):
  """[tm, width] mask of the tile's rows that lie in [start, end)."""
  rows = tile_id * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, width), 0)
  return (rows >= start) & (rows < end)
