"""Grouped matmul over expert-sorted rows (Pallas, Mosaic TPU lowering; interpretable on CPU).

Rows of `lhs` are laid out group after group: group e owns `group_sizes[e]` consecutive rows
starting at `sum(group_sizes[:e])`. Rows past `sum(group_sizes)` belong to no group and produce
zeros (a capacity-padded buffer works as is). A group that would run past M is cut at M.

  gmm:  out[r] = lhs[r] @ rhs[group(r)]                  [M, K] x [E, K, N] -> [M, N]
  tgmm: out[e] = sum_{r in group e} lhs[r]^T grad[r]     [M, K] x [M, N]    -> [E, K, N]

Kernel design. Rows are cut into m-tiles of `tm` rows. A group boundary may fall inside a tile,
so the grid walks "visits": one (group, m-tile) pair per step, group-major, so that a tile is
visited by consecutive steps only. Each visit computes the full tile product with its group's
weights and stores only the rows that belong to the group (a row mask), so after the last visit
every row holds its own group's result. The visit list is computed in jnp and passed as scalar
prefetch (TPU SMEM); its static length is the worst case `tiles_m + groups - 1`, and the steps
past the real count repeat the last visit's block indices (no new DMA) and do nothing.
gmm adds a "tail" pseudo-group for the rows past sum(group_sizes), which stores zeros; tgmm visits
each empty group once so that its [K, N] output block is written (with zeros).

Legend: M rows, K contraction, N output width, E groups (experts); tm/tk/tn tile sizes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from deepseek_jax.kernels_pallas.platform import per_platform


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes: `tm` rows, `tk` contraction, `tn` output columns (clamped to the problem)."""

  tm: int = 128
  tk: int = 128
  tn: int = 128

  def __post_init__(self):
    for name in ("tm", "tk", "tn"):
      v = getattr(self, name)
      if not isinstance(v, int) or v <= 0:
        raise ValueError(f"BlockSizes.{name} must be a positive int, got {v!r}")

  @classmethod
  def default(cls, platform: str | None = None, *, interpret: bool = False) -> BlockSizes:
    """Per-platform defaults.

    TPU: 512-wide tiles keep lhs/rhs/out double buffers plus the f32 accumulator near 4 MiB of
    VMEM (bf16), inside every generation's default scoped limit, and feed the MXU full tiles.
    Interpret mode (CPU): cost grows with the number of grid steps, so tiles are large.
    """
    platform = platform or jax.default_backend()
    if interpret or platform == "cpu":
      return cls(tm=128, tk=512, tn=512)
    if platform == "tpu":
      return cls(tm=512, tk=512, tn=512)
    return cls(tm=128, tk=128, tn=128)


def _round_up(x: int, m: int) -> int:
  return (x + m - 1) // m * m


def _tile(dim: int, block: int) -> tuple[int, int]:
  """(tile size, padded dim): the whole dim when it fits in one block, else `block`-sized tiles."""
  if dim <= block:
    return dim, dim
  return block, _round_up(dim, block)


def _pad_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  if x.shape == shape:
    return x
  return jnp.pad(x, [(0, t - s) for s, t in zip(x.shape, shape)])


def _check(lhs, rhs_or_grad, group_sizes, *, name, rhs_ndim):
  if lhs.ndim != 2:
    raise ValueError(f"{name}: lhs must be [M, K], got shape {lhs.shape}")
  if rhs_or_grad.ndim != rhs_ndim:
    raise ValueError(f"{name}: expected a {rhs_ndim}-d second operand, got shape {rhs_or_grad.shape}")
  if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f"{name}: group_sizes must be a 1-d integer array [E], got "
                     f"{group_sizes.dtype}{list(group_sizes.shape)}")


def group_bounds(group_sizes: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
  """Row range [start, end) of each group [E], cut at M."""
  ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m).astype(jnp.int32)
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
  return starts, ends


def _visits(starts, ends, *, tm: int, tiles_m: int, visit_empty: bool):
  """Visit list: (group id [V], m-tile id [V], real count [1]) with V = tiles_m + G - 1 static."""
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
  tile = first[gid] + step - (csum[gid] - n[gid])  # [V]
  return gid, tile.astype(jnp.int32), count.reshape(1).astype(jnp.int32)


def _row_mask(tile, start, end, tm: int, width: int):
  rows = tile * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, width), 0)
  return (rows >= start) & (rows < end)


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
    mask = _row_mask(tile_ref[step], starts_ref[g], ends_ref[g], tm, out_ref.shape[1])
    out_ref[...] = jnp.where(mask, acc_ref[...], out_ref[...].astype(jnp.float32)).astype(out_ref.dtype)


def _gmm_call(lhs, rhs, group_sizes, bs: BlockSizes, interpret: bool, out_dtype, transpose_rhs: bool):
  """Pallas grouped matmul; rhs is [E, K, N], or [E, N, K] when `transpose_rhs`."""
  m, k = lhs.shape
  e = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  tm, mp = _tile(m, bs.tm)
  tk, kp = _tile(k, bs.tk)
  tn, np_ = _tile(n, bs.tn)
  lhs_p = _pad_to(lhs, (mp, kp))
  rhs_p = _pad_to(rhs, (e, np_, kp) if transpose_rhs else (e, kp, np_))
  tiles_m, tiles_k, tiles_n = mp // tm, kp // tk, np_ // tn

  starts, ends = group_bounds(group_sizes, m)
  total = ends[-1]
  starts = jnp.concatenate([starts, total[None]])  # + tail pseudo-group [E + 1]
  ends = jnp.concatenate([ends, jnp.full((1,), mp, jnp.int32)])
  gid, tile, count = _visits(starts, ends, tm=tm, tiles_m=tiles_m, visit_empty=False)
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
    x = jnp.where(_row_mask(tile, start, end, tm, x.shape[1]), x, jnp.zeros_like(x))
    dy = jnp.where(_row_mask(tile, start, end, tm, dy.shape[1]), dy, jnp.zeros_like(dy))
    acc_ref[...] += jax.lax.dot_general(
        x.T, dy, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)  # [tk, tn]

  @pl.when(active & ((step == count - 1) | (g != next_g)))
  def _store():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _tgmm_call(lhs, grad, group_sizes, bs: BlockSizes, interpret: bool, out_dtype):
  m, k = lhs.shape
  n = grad.shape[1]
  e = group_sizes.shape[0]
  tm, mp = _tile(m, bs.tm)
  tk, kp = _tile(k, bs.tk)
  tn, np_ = _tile(n, bs.tn)
  lhs_p = _pad_to(lhs, (mp, kp))
  grad_p = _pad_to(grad, (mp, np_))
  tiles_m, tiles_k, tiles_n = mp // tm, kp // tk, np_ // tn

  starts, ends = group_bounds(group_sizes, m)
  gid, tile, count = _visits(starts, ends, tm=tm, tiles_m=tiles_m, visit_empty=True)
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


def _resolve(lhs, other, preferred_element_type):
  dtype = jnp.result_type(lhs.dtype, other.dtype)
  out_dtype = jnp.dtype(preferred_element_type) if preferred_element_type is not None else jnp.dtype(dtype)
  return dtype, out_dtype


def _blocks(block_sizes, interpret, platform) -> BlockSizes:
  return block_sizes if block_sizes is not None else BlockSizes.default(
      platform, interpret=bool(interpret))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _gmm(lhs, rhs, group_sizes, bs, interpret, out_dtype):
  return _gmm_call(lhs, rhs, group_sizes, bs, interpret, out_dtype, transpose_rhs=False)


def _gmm_fwd(lhs, rhs, group_sizes, bs, interpret, out_dtype):
  out = _gmm_call(lhs, rhs, group_sizes, bs, interpret, out_dtype, transpose_rhs=False)
  return out, (lhs, rhs, group_sizes)


def _gmm_bwd(bs, interpret, out_dtype, res, g):
  lhs, rhs, group_sizes = res
  g = g.astype(lhs.dtype)
  d_lhs = _gmm_call(g, rhs, group_sizes, bs, interpret, lhs.dtype, transpose_rhs=True)  # [M, K]
  d_rhs = _tgmm_call(lhs, g, group_sizes, bs, interpret, rhs.dtype)  # [E, K, N]
  return d_lhs, d_rhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, block_sizes: BlockSizes | None = None,
        interpret=None, preferred_element_type=None) -> jax.Array:
  """Grouped matmul: row r of lhs [M, K] times rhs[group(r)] [K, N] -> [M, N].

  Differentiable in `lhs` and `rhs` (custom VJP: d_lhs = gmm(grad, rhs^T), d_rhs = tgmm(lhs, grad));
  `group_sizes` [E] int gets no gradient. Accumulates in float32; the output has
  `preferred_element_type` or else the inputs' common dtype. `interpret=None` interprets the
  kernel where the program is lowered for the CPU and compiles it elsewhere (`per_platform`);
  block sizes default per platform.
  """
  _check(lhs, rhs, group_sizes, name="gmm", rhs_ndim=3)
  if rhs.shape[1] != lhs.shape[1] or rhs.shape[0] != group_sizes.shape[0]:
    raise ValueError(f"gmm: lhs {lhs.shape}, rhs {rhs.shape}, group_sizes {group_sizes.shape} "
                     "do not fit lhs [M, K], rhs [E, K, N], group_sizes [E]")
  dtype, out_dtype = _resolve(lhs, rhs, preferred_element_type)
  lhs, rhs, group_sizes = lhs.astype(dtype), rhs.astype(dtype), group_sizes.astype(jnp.int32)
  return per_platform(lambda interp, platform: _gmm(
      lhs, rhs, group_sizes, _blocks(block_sizes, interp, platform), interp, out_dtype), interpret)


def tgmm(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array, *, block_sizes: BlockSizes | None = None,
         interpret=None, preferred_element_type=None) -> jax.Array:
  """Per-group lhs^T @ grad: lhs [M, K], grad [M, N] -> [E, K, N]; an empty group gives zeros."""
  _check(lhs, grad, group_sizes, name="tgmm", rhs_ndim=2)
  if grad.shape[0] != lhs.shape[0]:
    raise ValueError(f"tgmm: lhs {lhs.shape} and grad {grad.shape} must share M")
  dtype, out_dtype = _resolve(lhs, grad, preferred_element_type)
  lhs, grad, group_sizes = lhs.astype(dtype), grad.astype(dtype), group_sizes.astype(jnp.int32)
  return per_platform(lambda interp, platform: _tgmm_call(
      lhs, grad, group_sizes, _blocks(block_sizes, interp, platform), interp, out_dtype), interpret)


def _row_groups(group_sizes: jax.Array, m: int) -> jax.Array:
  """One-hot group membership of each row [M, E] (all zeros past the last group)."""
  starts, ends = group_bounds(group_sizes, m)
  rows = jnp.arange(m, dtype=jnp.int32)[:, None]
  return ((rows >= starts[None, :]) & (rows < ends[None, :])).astype(jnp.float32)


def gmm_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                  preferred_element_type=None) -> jax.Array:
  """Pure-jnp twin of `gmm`: every group on every row, masked (E times the FLOPs; for tests)."""
  dtype = jnp.result_type(lhs.dtype, rhs.dtype)
  out_dtype = preferred_element_type or dtype
  onehot = _row_groups(group_sizes, lhs.shape[0])  # [M, E]
  y = jnp.einsum("mk,ekn->men", lhs, rhs, preferred_element_type=jnp.float32,
                 precision=jax.lax.Precision.HIGHEST)  # [M, E, N]
  return jnp.einsum("men,me->mn", y, onehot, precision=jax.lax.Precision.HIGHEST).astype(out_dtype)


def tgmm_reference(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array, *,
                   preferred_element_type=None) -> jax.Array:
  """Pure-jnp twin of `tgmm`: [E, K, N] sums of lhs[r]^T grad[r] over each group's rows."""
  dtype = jnp.result_type(lhs.dtype, grad.dtype)
  out_dtype = preferred_element_type or dtype
  onehot = _row_groups(group_sizes, lhs.shape[0])  # [M, E]
  return jnp.einsum("mk,me,mn->ekn", lhs.astype(jnp.float32), onehot, grad.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST).astype(out_dtype)
