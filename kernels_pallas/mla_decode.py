"""Flash-decoding over MLA's compressed latent cache (absorbed decode path; Pallas, Mosaic TPU).

In the absorbed form every head attends to the same per-position latent row c = [c_kv (L) | k_rope (R)]:

  scores[b, h, s] = softmax_scale * q[b, h, :] . cache[b, s, :]      over the full L + R width
  out[b, h, :]    = sum_s softmax_s(scores[b, h, s]) * cache[b, s, :L]    for s < lengths[b]

A row with length 0 returns zeros. The kernel splits S into `num_splits` parts (grid B x splits x
blocks per split, the last axis sequential); each part runs an online softmax over its blocks and
writes a normalised partial output with its log-sum-exp; a log-sum-exp combine in jnp merges the
parts. Blocks past a row's length are skipped, and their index map repeats the last useful block
so that no new cache block is fetched. Softmax math is float32; the value product takes the
cache dtype with float32 accumulation.

Legend: B batch, H heads, S cache positions, L kv_lora_rank (latent), R rope dim, W = L + R,
P parts (splits), bs block of positions.
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
class DecodeBlockSizes:
  """`block_s` cache positions per grid step; `num_splits` independent parts of S (flash-decoding)."""

  block_s: int = 512
  num_splits: int = 8

  def __post_init__(self):
    if self.block_s <= 0 or self.block_s % 8:
      raise ValueError(f"DecodeBlockSizes.block_s must be a positive multiple of 8, got {self.block_s}")
    if self.num_splits <= 0:
      raise ValueError(f"DecodeBlockSizes.num_splits must be positive, got {self.num_splits}")

  @classmethod
  def default(cls, platform: str | None = None, *, interpret: bool = False) -> DecodeBlockSizes:
    """TPU: 512-position blocks (576 x 512 bf16 = 576 KiB a buffer); interpret: few large steps."""
    platform = platform or jax.default_backend()
    if interpret or platform == "cpu":
      return cls(block_s=512, num_splits=2)
    return cls(block_s=512, num_splits=8)


def _decode_kernel(lengths_ref, q_ref, c_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc,
                   *, scale: float, latent: int, block_s: int, blocks_per_split: int, seq_len: int):
  b, p, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  start = (p * blocks_per_split + j) * block_s
  length = jnp.minimum(lengths_ref[b], seq_len)

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full_like(m_sc, -jnp.inf)
    l_sc[...] = jnp.zeros_like(l_sc)
    acc_sc[...] = jnp.zeros_like(acc_sc)

  @pl.when(start < length)
  def _block():
    q = q_ref[...]  # [H, W]
    c = c_ref[...]  # [bs, W]
    s = jax.lax.dot_general(q, c, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)  # [H, bs]
    s = s * scale
    pos = start + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
    s = jnp.where(pos < length, s, -jnp.inf)
    m_prev = m_sc[...]  # [H, 1]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # finite: start < length
    alpha = jnp.exp(m_prev - m_new)
    prob = jnp.exp(s - m_new)  # [H, bs]
    l_sc[...] = alpha * l_sc[...] + jnp.sum(prob, axis=1, keepdims=True)
    # Rows past the length (stale cache, or past S in a partial last block) may hold NaN: zero them.
    v = c[:, :latent]  # [bs, L]
    rows = start + jax.lax.broadcasted_iota(jnp.int32, v.shape, 0)
    v = jnp.where(rows < length, v, jnp.zeros_like(v))
    pv = jax.lax.dot_general(prob.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)  # [H, L]
    acc_sc[...] = alpha * acc_sc[...] + pv
    m_sc[...] = m_new

  @pl.when(j == blocks_per_split - 1)
  def _finish():
    l = l_sc[...]
    seen = l > 0
    o_ref[...] = jnp.where(seen, acc_sc[...] / jnp.where(seen, l, 1.0), 0.0)
    lse_ref[...] = jnp.where(seen, m_sc[...] + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)


def _combine(o_parts: jax.Array, lse_parts: jax.Array) -> jax.Array:
  """Merge normalised parts [B, P, H, L] with their log-sum-exps [B, P, H, 1] -> [B, H, L] f32."""
  m = jnp.max(lse_parts, axis=1, keepdims=True)  # [B, 1, H, 1]
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  w = jnp.exp(lse_parts - m)  # [B, P, H, 1]; 0 for empty parts
  total = jnp.sum(w, axis=1)  # [B, H, 1]
  out = jnp.einsum("bphl,bph->bhl", o_parts, w[..., 0])
  return jnp.where(total > 0, out / jnp.where(total > 0, total, 1.0), 0.0)


def _decode_call(q, cache, lengths, kv_lora_rank, softmax_scale, bs: DecodeBlockSizes, interpret: bool):
  b, h, w = q.shape
  s_len = cache.shape[1]
  block_s = min(bs.block_s, s_len)
  num_blocks = pl.cdiv(s_len, block_s)
  num_splits = min(bs.num_splits, num_blocks)
  per_split = pl.cdiv(num_blocks, num_splits)

  def q_map(b_i, p, j, lengths):
    return b_i, 0, 0

  def c_map(b_i, p, j, lengths):
    last = jnp.maximum(pl.cdiv(jnp.minimum(lengths[b_i], s_len), block_s) - 1, 0)  # last useful block
    return b_i, jnp.minimum(p * per_split + j, last), 0

  def part_map(b_i, p, j, lengths):
    return b_i, p, 0, 0

  kernel = functools.partial(_decode_kernel, scale=float(softmax_scale), latent=kv_lora_rank,
                             block_s=block_s, blocks_per_split=per_split, seq_len=s_len)
  itemsize = jnp.dtype(cache.dtype).itemsize
  cost = pl.CostEstimate(flops=2 * b * h * s_len * (w + kv_lora_rank), transcendentals=b * h * s_len,
                         bytes_accessed=(cache.size + q.size) * itemsize + b * num_splits * h * (kv_lora_rank + 1) * 4)
  o_parts, lse_parts = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((b, num_splits, h, kv_lora_rank), jnp.float32),
                 jax.ShapeDtypeStruct((b, num_splits, h, 1), jnp.float32)),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(b, num_splits, per_split),
          in_specs=[pl.BlockSpec((None, h, w), q_map), pl.BlockSpec((None, block_s, w), c_map)],
          out_specs=[pl.BlockSpec((None, None, h, kv_lora_rank), part_map),
                     pl.BlockSpec((None, None, h, 1), part_map)],
          scratch_shapes=[pltpu.VMEM((h, 1), jnp.float32), pltpu.VMEM((h, 1), jnp.float32),
                          pltpu.VMEM((h, kv_lora_rank), jnp.float32)],
      ),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      cost_estimate=cost,
      name="mla_decode",
  )(lengths, q, cache)
  return _combine(o_parts, lse_parts).astype(q.dtype)


def mla_decode_reference(q: jax.Array, cache: jax.Array, lengths: jax.Array, *, kv_lora_rank: int,
                         softmax_scale: float) -> jax.Array:
  """Pure-jnp twin of `mla_decode_attention` (float32 softmax; zeros for rows of length 0)."""
  s = jnp.einsum("bhw,bsw->bhs", q.astype(jnp.float32), cache.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST) * softmax_scale  # [B, H, S]
  valid = jnp.arange(cache.shape[1])[None, None, :] < lengths[:, None, None]
  s = jnp.where(valid, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  prob = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))  # 0 where masked
  denom = jnp.sum(prob, axis=-1, keepdims=True)
  prob = prob / jnp.where(denom > 0, denom, 1.0)
  values = jnp.where(valid[:, 0, :, None], cache[..., :kv_lora_rank].astype(jnp.float32), 0.0)  # [B, S, L]
  out = jnp.einsum("bhs,bsl->bhl", prob, values, precision=jax.lax.Precision.HIGHEST)
  return out.astype(q.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _decode(q, cache, lengths, kv_lora_rank, softmax_scale, bs, interpret):
  return _decode_call(q, cache, lengths, kv_lora_rank, softmax_scale, bs, interpret)


def _decode_fwd(q, cache, lengths, kv_lora_rank, softmax_scale, bs, interpret):
  return _decode_call(q, cache, lengths, kv_lora_rank, softmax_scale, bs, interpret), (q, cache, lengths)


def _decode_bwd(kv_lora_rank, softmax_scale, bs, interpret, res, g):
  """Gradient through the reference (materialises [B, H, S] scores; decoding needs no gradient)."""
  q, cache, lengths = res
  ref = functools.partial(mla_decode_reference, lengths=lengths, kv_lora_rank=kv_lora_rank,
                          softmax_scale=softmax_scale)
  _, vjp = jax.vjp(ref, q, cache)
  d_q, d_cache = vjp(g)
  return d_q, d_cache, None


_decode.defvjp(_decode_fwd, _decode_bwd)


def mla_decode_attention(q: jax.Array, cache: jax.Array, lengths: jax.Array, *, kv_lora_rank: int,
                         softmax_scale: float, block_sizes: DecodeBlockSizes | None = None,
                         interpret=None) -> jax.Array:
  """Absorbed-MLA decode attention: q [B, H, L+R], cache [B, S, L+R], lengths [B] -> [B, H, L].

  Positions >= lengths[b] are masked (lengths past S are cut at S); rows of length 0 give zeros.
  Output dtype is q's. Differentiable (backward through the reference; meant for checks only).
  `interpret=None` interprets where the program is lowered for the CPU (`per_platform`).
  """
  if q.ndim != 3 or cache.ndim != 3:
    raise ValueError(f"mla_decode_attention: q must be [B, H, L+R] and cache [B, S, L+R], got {q.shape}, {cache.shape}")
  if q.shape[0] != cache.shape[0] or q.shape[2] != cache.shape[2]:
    raise ValueError(f"mla_decode_attention: q {q.shape} and cache {cache.shape} disagree on B or L+R")
  if lengths.shape != (q.shape[0],) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"mla_decode_attention: lengths must be int [B={q.shape[0]}], got {lengths.dtype}{list(lengths.shape)}")
  if not 0 < kv_lora_rank <= q.shape[2]:
    raise ValueError(f"mla_decode_attention: kv_lora_rank {kv_lora_rank} must be in (0, {q.shape[2]}]")
  cache = cache.astype(jnp.result_type(q.dtype, cache.dtype))
  q, lengths = q.astype(cache.dtype), lengths.astype(jnp.int32)

  def run(interp, platform):
    bs = block_sizes if block_sizes is not None else DecodeBlockSizes.default(
        platform, interpret=bool(interp))
    return _decode(q, cache, lengths, kv_lora_rank, float(softmax_scale), bs, interp)
  return per_platform(run, interpret)
