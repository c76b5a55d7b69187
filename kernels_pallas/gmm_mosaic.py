"""Grouped matmul kernels for TPUs (Pallas, Mosaic TPU lowering; interpretable on the CPU).

  gmm:  out[r] = lhs[r] @ rhs[group(r)]                  [M, K] x [E, K, N] -> [M, N]
  tgmm: out[e] = sum_{r in group e} lhs[r]^T grad[r]     [M, K] x [M, N]    -> [E, K, N]

The grid walks the visits of `grouping` (one (group, m-tile) pair per step, group-major, so that
a tile is visited by consecutive steps only). Each visit computes the full tile product with its
group's weights and stores only the rows that belong to the group (a row mask), so after the last
visit every row holds its own group's result. The visit list is scalar prefetch (TPU SMEM); the
steps past the real count repeat the last visit's block indices (no new DMA) and do nothing.
gmm adds a "tail" pseudo-group for the rows past sum(group_sizes), which stores zeros; tgmm visits
each empty group once so that its [K, N] output block is written (with zeros).

`bs` is a `gmm.BlockSizes` (tm, tk, tn). Legend: M rows, K contraction, N output width, E groups.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from deepseek_jax.kernels_pallas import grouping


def _prefetch_call(kernel, out_shape, grid, in_specs, out_spec, acc_shape, semantics, interpret,
                   cost, name, *args):
  """pallas_call with the 5 visit arrays (starts, ends, gid, tile, count) as scalar prefetch and
  one float32 VMEM accumulator of `acc_shape`; `args` are those 5 arrays then the operands."""
  return pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5, grid=grid, in_specs=in_specs, out_specs=out_spec,
          scratch_shapes=[pltpu.VMEM(acc_shape, jnp.float32)]),
      compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
      interpret=interpret,
      cost_estimate=cost,
      name=name,
  )(*args)


def _gmm_kernel(starts_ref, ends_ref, gid_ref, tile_ref, count_ref, lhs_ref, rhs_ref, out_ref, acc_ref,
                *, num_groups: int, tiles_k: int, tm: int, transpose_rhs: bool):
  step, k_i = pl.program_id(1), pl.program_id(2)
  g = gid_ref[step]
  active = step < count_ref[0]

  @pl.when(k_i == 0)
  def _zero():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(active & (g < num_groups))  # the tail pseudo-group (g == E) keeps a zero accumulator
  def _accumulate():
    contract = 1 if transpose_rhs else 0
    acc_ref[...] += jax.lax.dot_general(
        lhs_ref[...], rhs_ref[...], (((1,), (contract,)), ((), ())),
        preferred_element_type=jnp.float32)  # [tm, tn]

  @pl.when(active & (k_i == tiles_k - 1))
  def _store():
    mask = grouping.row_mask(tile_ref[step], starts_ref[g], ends_ref[g], tm, out_ref.shape[1])
    out_ref[...] = jnp.where(mask, acc_ref[...], out_ref[...].astype(jnp.float32)).astype(out_ref.dtype)


def gmm_call(lhs, rhs, group_sizes, bs, interpret: bool, out_dtype, transpose_rhs: bool):
  """Pallas grouped matmul; rhs is [E, K, N], or [E, N, K] when `transpose_rhs`."""
  m, k = lhs.shape
  e = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  tm, mp = grouping.tile(m, bs.tm)
  tk, kp = grouping.tile(k, bs.tk)
  tn, np_ = grouping.tile(n, bs.tn)
  lhs_p = grouping.pad_to(lhs, (mp, kp))
  rhs_p = grouping.pad_to(rhs, (e, np_, kp) if transpose_rhs else (e, kp, np_))
  tiles_m, tiles_k, tiles_n = mp // tm, kp // tk, np_ // tn

  starts, ends = grouping.with_tail(*grouping.group_bounds(group_sizes, m), mp)  # [E + 1]
  gid, tile, count = grouping.visits(starts, ends, tm=tm, tiles_m=tiles_m, visit_empty=False)
  num_visits = gid.shape[0]

  def lhs_map(n_i, v, k_i, starts, ends, gid, tile, count):
    return tile[v], k_i

  def rhs_map(n_i, v, k_i, starts, ends, gid, tile, count):
    g = jnp.minimum(gid[v], e - 1)
    return (g, n_i, k_i) if transpose_rhs else (g, k_i, n_i)

  def out_map(n_i, v, k_i, starts, ends, gid, tile, count):
    return tile[v], n_i

  rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
  kernel = functools.partial(_gmm_kernel, num_groups=e, tiles_k=tiles_k, tm=tm, transpose_rhs=transpose_rhs)
  itemsize = jnp.dtype(lhs.dtype).itemsize
  cost = pl.CostEstimate(
      flops=2 * m * k * n, transcendentals=0,
      bytes_accessed=(m * k * tiles_n + e * k * n + m * n) * itemsize)
  out = _prefetch_call(kernel, jax.ShapeDtypeStruct((mp, np_), out_dtype),
                       (tiles_n, num_visits, tiles_k),
                       [pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
                       pl.BlockSpec((tm, tn), out_map), (tm, tn),
                       ("parallel", "arbitrary", "arbitrary"), interpret, cost, "gmm",
                       starts, ends, gid, tile, count, lhs_p, rhs_p)
  return out[:m, :n]


def _tgmm_kernel(starts_ref, ends_ref, gid_ref, tile_ref, count_ref, lhs_ref, grad_ref, out_ref, acc_ref,
                 *, tm: int):
  step = pl.program_id(2)
  count = count_ref[0]
  last_step = pl.num_programs(2) - 1
  g = gid_ref[step]
  prev_g = gid_ref[jnp.maximum(step - 1, 0)]
  next_g = gid_ref[jnp.minimum(step + 1, last_step)]
  active = step < count
  start, end = starts_ref[g], ends_ref[g]

  @pl.when(active & ((step == 0) | (g != prev_g)))
  def _zero():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(active & (end > start))
  def _accumulate():
    tile = tile_ref[step]
    x = lhs_ref[...]  # [tm, tk]
    dy = grad_ref[...]  # [tm, tn]
    x = jnp.where(grouping.row_mask(tile, start, end, tm, x.shape[1]), x, jnp.zeros_like(x))
    dy = jnp.where(grouping.row_mask(tile, start, end, tm, dy.shape[1]), dy, jnp.zeros_like(dy))
    acc_ref[...] += jax.lax.dot_general(
        x.T, dy, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)  # [tk, tn]

  @pl.when(active & ((step == count - 1) | (g != next_g)))
  def _store():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm_call(lhs, grad, group_sizes, bs, interpret: bool, out_dtype):
  m, k = lhs.shape
  n = grad.shape[1]
  e = group_sizes.shape[0]
  tm, mp = grouping.tile(m, bs.tm)
  tk, kp = grouping.tile(k, bs.tk)
  tn, np_ = grouping.tile(n, bs.tn)
  lhs_p = grouping.pad_to(lhs, (mp, kp))
  grad_p = grouping.pad_to(grad, (mp, np_))
  tiles_m, tiles_k, tiles_n = mp // tm, kp // tk, np_ // tn

  starts, ends = grouping.group_bounds(group_sizes, m)
  gid, tile, count = grouping.visits(starts, ends, tm=tm, tiles_m=tiles_m, visit_empty=True)
  num_visits = gid.shape[0]

  def lhs_map(n_i, k_i, v, starts, ends, gid, tile, count):
    return tile[v], k_i

  def grad_map(n_i, k_i, v, starts, ends, gid, tile, count):
    return tile[v], n_i

  def out_map(n_i, k_i, v, starts, ends, gid, tile, count):
    return gid[v], k_i, n_i

  itemsize = jnp.dtype(lhs.dtype).itemsize
  cost = pl.CostEstimate(
      flops=2 * m * k * n, transcendentals=0,
      bytes_accessed=(m * k * tiles_n + m * n * tiles_k + e * k * n) * itemsize)
  out = _prefetch_call(functools.partial(_tgmm_kernel, tm=tm),
                       jax.ShapeDtypeStruct((e, kp, np_), out_dtype), (tiles_n, tiles_k, num_visits),
                       [pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec((tm, tn), grad_map)],
                       pl.BlockSpec((None, tk, tn), out_map), (tk, tn),
                       ("parallel", "parallel", "arbitrary"), interpret, cost, "tgmm",
                       starts, ends, gid, tile, count, lhs_p, grad_p)
  return out[:, :k, :n]
