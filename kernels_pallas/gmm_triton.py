"""Grouped matmul kernels for GPUs (Pallas, Triton lowering: NVIDIA via CUDA, AMD via ROCm).

  gmm:  out[r] = lhs[r] @ rhs[group(r)]                  [M, K] x [E, K, N] -> [M, N]
  tgmm: out[e] = sum_{r in group e} lhs[r]^T grad[r]     [M, K] x [M, N]    -> [E, K, N]

The Triton backend has no scalar prefetch and no sequential grid revisits, and it needs not:
its refs are pointers into global memory, loads and stores take row masks, and the programs of
a launch run in any order.

- gmm: one program per (n-tile, visit) of `grouping.visits` (plus a "tail" pseudo-group that
  writes zeros to the rows past the last group). A program loops over K in `tk` steps (a static
  loop, which Triton software-pipelines), loads its m-tile's rows masked to its group, multiplies
  by the group's [tk, tn] weight block with float32 accumulation, and stores only its group's
  rows. Two groups sharing an m-tile write disjoint rows, so no program waits for another.
  The n-tile is grid axis 0 (the fastest-launched), so the programs in flight at once share
  their lhs tiles and their group's weights in L2.
- tgmm: one program per (n-tile, k-tile, group); it walks its group's rows in `tm` steps (a
  loop with a traced trip count) accumulating lhs^T grad; an empty group writes zeros.

Tiles are powers of two of at least 16 (Triton's dot); K and N are padded to whole tiles when
they are not multiples (never for DeepSeek's widths), M never (rows are masked).

Legend: M rows, K contraction, N output width, E groups, V visits; tm/tk/tn tile sizes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from deepseek_jax.kernels_pallas import grouping

MIN_TILE = 16  # Triton's dot needs every dimension >= 16


def _pow2_tile(dim: int, block: int) -> tuple[int, int]:
  """(tile, padded dim): a power-of-two tile of at most `block` (at least 16) covering `dim`."""
  t = max(MIN_TILE, min(pl.next_power_of_2(block), pl.next_power_of_2(dim)))
  return t, grouping.round_up(dim, t)


def _params(bs):
  return plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages)


def _gmm_kernel(starts_ref, ends_ref, gid_ref, tile_ref, count_ref, lhs_ref, rhs_ref, out_ref,
                *, num_groups: int, tiles_k: int, tm: int, tk: int, tn: int, transpose_rhs: bool):
  n_i, v = pl.program_id(0), pl.program_id(1)
  g = gid_ref[v]
  t = tile_ref[v]
  active = v < count_ref[0]
  rows = t * tm + jnp.arange(tm, dtype=jnp.int32)  # [tm]
  mask = ((rows >= starts_ref[g]) & (rows < ends_ref[g]))[:, None]  # [tm, 1]
  row_block = pl.ds(t * tm, tm)
  col_block = pl.ds(n_i * tn, tn)

  @pl.when(active & (g < num_groups))
  def _product():
    def step(k_i, acc):
      a = plgpu.load(lhs_ref.at[row_block, pl.ds(k_i * tk, tk)], mask=mask, other=0)  # [tm, tk]
      if transpose_rhs:
        b = rhs_ref[g, col_block, pl.ds(k_i * tk, tk)]  # [tn, tk]
      else:
        b = rhs_ref[g, pl.ds(k_i * tk, tk), col_block]  # [tk, tn]
      return acc + jax.lax.dot_general(a, b, (((1,), (1 if transpose_rhs else 0,)), ((), ())),
                                       preferred_element_type=jnp.float32)
    acc = jax.lax.fori_loop(0, tiles_k, step, jnp.zeros((tm, tn), jnp.float32))
    plgpu.store(out_ref.at[row_block, col_block], acc.astype(out_ref.dtype), mask=mask)

  @pl.when(active & (g == num_groups))  # the tail pseudo-group: rows past the last group
  def _zeros():
    plgpu.store(out_ref.at[row_block, col_block], jnp.zeros((tm, tn), out_ref.dtype), mask=mask)


def gmm_call(lhs, rhs, group_sizes, bs, interpret, out_dtype, transpose_rhs: bool):
  """Triton grouped matmul; rhs is [E, K, N], or [E, N, K] when `transpose_rhs`."""
  m, k = lhs.shape
  e = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  tm = _pow2_tile(m, bs.tm)[0]
  tk, kp = _pow2_tile(k, bs.tk)
  tn, np_ = _pow2_tile(n, bs.tn)
  lhs_p = grouping.pad_to(lhs, (m, kp))
  rhs_p = grouping.pad_to(rhs, (e, np_, kp) if transpose_rhs else (e, kp, np_))
  tiles_m, tiles_k, tiles_n = pl.cdiv(m, tm), kp // tk, np_ // tn

  starts, ends = grouping.with_tail(*grouping.group_bounds(group_sizes, m), m)  # [E + 1]
  gid, tile_ids, count = grouping.visits(starts, ends, tm=tm, tiles_m=tiles_m, visit_empty=False)
  kernel = functools.partial(_gmm_kernel, num_groups=e, tiles_k=tiles_k, tm=tm, tk=tk, tn=tn,
                             transpose_rhs=transpose_rhs)
  itemsize = jnp.dtype(lhs.dtype).itemsize
  cost = pl.CostEstimate(flops=2 * m * k * n, transcendentals=0,
                         bytes_accessed=(m * k * tiles_n + e * k * n + m * n) * itemsize)
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, np_), out_dtype),
      grid=(tiles_n, gid.shape[0]),
      compiler_params=_params(bs),
      interpret=interpret,
      cost_estimate=cost,
      name="gmm_triton",
  )(starts, ends, gid, tile_ids, count, lhs_p, rhs_p)
  return out[:, :n]


def _tgmm_kernel(starts_ref, ends_ref, lhs_ref, grad_ref, out_ref, *, tm: int, tk: int, tn: int):
  n_i, k_i, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  start, end = starts_ref[g], ends_ref[g]

  def step(i, acc):
    first = start + i * tm
    mask = ((first + jnp.arange(tm, dtype=jnp.int32)) < end)[:, None]  # [tm, 1]
    x = plgpu.load(lhs_ref.at[pl.ds(first, tm), pl.ds(k_i * tk, tk)], mask=mask, other=0)
    dy = plgpu.load(grad_ref.at[pl.ds(first, tm), pl.ds(n_i * tn, tn)], mask=mask, other=0)
    return acc + jax.lax.dot_general(x, dy, (((0,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)  # [tk, tn]

  steps = (end - start + tm - 1) // tm
  acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((tk, tn), jnp.float32))
  out_ref[g, pl.ds(k_i * tk, tk), pl.ds(n_i * tn, tn)] = acc.astype(out_ref.dtype)


def tgmm_call(lhs, grad, group_sizes, bs, interpret, out_dtype):
  m, k = lhs.shape
  n = grad.shape[1]
  e = group_sizes.shape[0]
  tm = _pow2_tile(m, bs.tm)[0]
  tk, kp = _pow2_tile(k, bs.tk)
  tn, np_ = _pow2_tile(n, bs.tn)
  lhs_p = grouping.pad_to(lhs, (m, kp))
  grad_p = grouping.pad_to(grad, (m, np_))
  tiles_k, tiles_n = kp // tk, np_ // tn
  starts, ends = grouping.group_bounds(group_sizes, m)
  itemsize = jnp.dtype(lhs.dtype).itemsize
  cost = pl.CostEstimate(flops=2 * m * k * n, transcendentals=0,
                         bytes_accessed=(m * k * tiles_n + m * n * tiles_k + e * k * n) * itemsize)
  out = pl.pallas_call(
      functools.partial(_tgmm_kernel, tm=tm, tk=tk, tn=tn),
      out_shape=jax.ShapeDtypeStruct((e, kp, np_), out_dtype),
      grid=(tiles_n, tiles_k, e),
      compiler_params=_params(bs),
      interpret=interpret,
      cost_estimate=cost,
      name="tgmm_triton",
  )(starts, ends, lhs_p, grad_p)
  return out[:, :k, :n]
