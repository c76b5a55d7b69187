"""Grouped matmul over expert-sorted rows: one op, a Pallas kernel per platform, a jnp twin.

Rows of `lhs` are laid out group after group: group e owns `group_sizes[e]` consecutive rows
starting at `sum(group_sizes[:e])`. Rows past `sum(group_sizes)` belong to no group and produce
zeros (a capacity-padded buffer works as is). A group that would run past M is cut at M.

  gmm:  out[r] = lhs[r] @ rhs[group(r)]                  [M, K] x [E, K, N] -> [M, N]
  tgmm: out[e] = sum_{r in group e} lhs[r]^T grad[r]     [M, K] x [M, N]    -> [E, K, N]

Backends (`platform.backend_for`), chosen for the platform the program is lowered for:
`gmm_mosaic` on TPUs (and interpreted on the CPU), `gmm_triton` on GPUs (CUDA and ROCm). Both
walk the same (group, m-tile) visits (`grouping`); `backend=` forces one (the CPU tests run the
Triton kernel in the interpreter that way). The custom VJP is apart from the backends:
d_lhs = gmm(grad, rhs^T) and d_rhs = tgmm(lhs, grad), each through the same backend.

Legend: M rows, K contraction, N output width, E groups (experts); tm/tk/tn tile sizes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from deepseek_jax.kernels_pallas import gmm_mosaic, gmm_triton, grouping
from deepseek_jax.kernels_pallas.platform import backend_for, gpu_device_kind, per_platform

group_bounds = grouping.group_bounds


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes: `tm` rows, `tk` contraction, `tn` output columns (clamped to the problem; the
  Triton kernels round them to powers of two of at least 16). `num_warps` and `num_stages` are
  Triton's launch settings (None: Pallas's defaults); the Mosaic-TPU kernels ignore them."""

  tm: int = 128
  tk: int = 128
  tn: int = 128
  num_warps: int | None = None
  num_stages: int | None = None

  def __post_init__(self):
    for name in ("tm", "tk", "tn"):
      v = getattr(self, name)
      if not isinstance(v, int) or v <= 0:
        raise ValueError(f"BlockSizes.{name} must be a positive int, got {v!r}")
    for name in ("num_warps", "num_stages"):
      v = getattr(self, name)
      if v is not None and (not isinstance(v, int) or v <= 0):
        raise ValueError(f"BlockSizes.{name} must be a positive int or None, got {v!r}")

  @classmethod
  def default(cls, platform: str | None = None, *, interpret: bool = False,
              device_kind: str | None = None) -> BlockSizes:
    """Per-platform defaults; on GPUs per device kind (`GPU_BLOCK_SIZES`).

    TPU: 512-wide tiles keep lhs/rhs/out double buffers plus the f32 accumulator near 4 MiB of
    VMEM (bf16), inside every generation's default scoped limit, and feed the MXU full tiles.
    Interpret mode (CPU): cost grows with the number of grid steps, so tiles are large.
    """
    platform = platform or jax.default_backend()
    if interpret or platform == "cpu":
      return cls(tm=128, tk=512, tn=512)
    if platform == "tpu":
      return cls(tm=512, tk=512, tn=512)
    return gpu_block_sizes(device_kind or gpu_device_kind())


# Triton tiles per GPU family (first matching substring of the device kind wins): 128 x 128
# output tiles with float32 accumulators in registers; K steps of 64 where shared memory holds
# 3 stages of them (Hopper, Blackwell, CDNA3), 32 on smaller parts. bench/gpu.py sweeps these.
GPU_BLOCK_SIZES = (
    (("H100", "H200", "H800", "H20", "GH200", "B200", "B300", "GB200", "GB300"),
     BlockSizes(tm=128, tk=64, tn=128, num_warps=8, num_stages=3)),
    (("A100", "A800", "A30", "A10", "L4", "L40", "RTX"),
     BlockSizes(tm=128, tk=32, tn=128, num_warps=4, num_stages=4)),
    (("gfx94", "gfx95", "gfx90a", "MI300", "MI325", "MI355", "MI250", "MI210"),
     BlockSizes(tm=128, tk=64, tn=128, num_warps=8, num_stages=2)),
)
GPU_FALLBACK = BlockSizes(tm=64, tk=32, tn=64, num_warps=4, num_stages=2)


def gpu_block_sizes(device_kind: str | None) -> BlockSizes:
  """Triton block sizes for a GPU's `device_kind` (None or unknown: small, safe tiles)."""
  for names, bs in GPU_BLOCK_SIZES:
    if device_kind and any(name in device_kind for name in names):
      return bs
  return GPU_FALLBACK


def _check(lhs, rhs_or_grad, group_sizes, *, name, rhs_ndim):
  if lhs.ndim != 2:
    raise ValueError(f"{name}: lhs must be [M, K], got shape {lhs.shape}")
  if rhs_or_grad.ndim != rhs_ndim:
    raise ValueError(f"{name}: expected a {rhs_ndim}-d second operand, got shape {rhs_or_grad.shape}")
  if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f"{name}: group_sizes must be a 1-d integer array [E], got "
                     f"{group_sizes.dtype}{list(group_sizes.shape)}")


_BACKENDS = {"mosaic_tpu": gmm_mosaic, "triton": gmm_triton}


def _resolve(lhs, other, preferred_element_type):
  dtype = jnp.result_type(lhs.dtype, other.dtype)
  out_dtype = jnp.dtype(preferred_element_type) if preferred_element_type is not None else jnp.dtype(dtype)
  return dtype, out_dtype


def _blocks(block_sizes, interpret, platform, backend: str) -> BlockSizes:
  if block_sizes is not None:
    return block_sizes
  if backend == "triton" and not interpret:
    platform = "gpu"
  return BlockSizes.default(platform, interpret=bool(interpret))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _gmm(lhs, rhs, group_sizes, bs, interpret, out_dtype, backend):
  return _BACKENDS[backend].gmm_call(lhs, rhs, group_sizes, bs, interpret, out_dtype,
                                     transpose_rhs=False)


def _gmm_fwd(lhs, rhs, group_sizes, bs, interpret, out_dtype, backend):
  out = _BACKENDS[backend].gmm_call(lhs, rhs, group_sizes, bs, interpret, out_dtype,
                                    transpose_rhs=False)
  return out, (lhs, rhs, group_sizes)


def _gmm_bwd(bs, interpret, out_dtype, backend, res, g):
  lhs, rhs, group_sizes = res
  g = g.astype(lhs.dtype)
  kernels = _BACKENDS[backend]
  d_lhs = kernels.gmm_call(g, rhs, group_sizes, bs, interpret, lhs.dtype, transpose_rhs=True)
  d_rhs = kernels.tgmm_call(lhs, g, group_sizes, bs, interpret, rhs.dtype)  # [E, K, N]
  return d_lhs, d_rhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, block_sizes: BlockSizes | None = None,
        interpret=None, preferred_element_type=None, backend: str | None = None) -> jax.Array:
  """Grouped matmul: row r of lhs [M, K] times rhs[group(r)] [K, N] -> [M, N].

  Differentiable in `lhs` and `rhs` (custom VJP: d_lhs = gmm(grad, rhs^T), d_rhs = tgmm(lhs, grad));
  `group_sizes` [E] int gets no gradient. Accumulates in float32; the output has
  `preferred_element_type` or else the inputs' common dtype. `interpret=None` interprets the
  kernel where the program is lowered for the CPU and compiles it elsewhere (`per_platform`);
  the backend (`backend_for`: "mosaic_tpu" or "triton") and the block sizes follow that platform
  (on GPUs, its device kind) unless given.
  """
  _check(lhs, rhs, group_sizes, name="gmm", rhs_ndim=3)
  if rhs.shape[1] != lhs.shape[1] or rhs.shape[0] != group_sizes.shape[0]:
    raise ValueError(f"gmm: lhs {lhs.shape}, rhs {rhs.shape}, group_sizes {group_sizes.shape} "
                     "do not fit lhs [M, K], rhs [E, K, N], group_sizes [E]")
  dtype, out_dtype = _resolve(lhs, rhs, preferred_element_type)
  lhs, rhs, group_sizes = lhs.astype(dtype), rhs.astype(dtype), group_sizes.astype(jnp.int32)

  def run(interp, platform):
    be = backend_for(platform, backend)
    return _gmm(lhs, rhs, group_sizes, _blocks(block_sizes, interp, platform, be), interp,
                out_dtype, be)
  return per_platform(run, interpret)


def tgmm(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array, *, block_sizes: BlockSizes | None = None,
         interpret=None, preferred_element_type=None, backend: str | None = None) -> jax.Array:
  """Per-group lhs^T @ grad: lhs [M, K], grad [M, N] -> [E, K, N]; an empty group gives zeros."""
  _check(lhs, grad, group_sizes, name="tgmm", rhs_ndim=2)
  if grad.shape[0] != lhs.shape[0]:
    raise ValueError(f"tgmm: lhs {lhs.shape} and grad {grad.shape} must share M")
  dtype, out_dtype = _resolve(lhs, grad, preferred_element_type)
  lhs, grad, group_sizes = lhs.astype(dtype), grad.astype(dtype), group_sizes.astype(jnp.int32)

  def run(interp, platform):
    be = backend_for(platform, backend)
    return _BACKENDS[be].tgmm_call(lhs, grad, group_sizes, _blocks(block_sizes, interp, platform, be),
                                   interp, out_dtype)
  return per_platform(run, interpret)


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
