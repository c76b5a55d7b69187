"""Flash-decoding over MLA's latent cache for TPUs (Pallas, Mosaic TPU; interpretable on the CPU).

Grid B x splits x blocks per split (the last axis sequential): each split runs an online softmax
over its blocks into VMEM scratch and writes a normalised partial output with its log-sum-exp
(`mla_decode` combines them). Blocks past a row's length are skipped, and their index map
repeats the last useful block so that no new cache block is fetched. The whole [H, L + R] query
and [block_s, L + R] cache block are one MXU product each. `bs` is a `mla_decode.DecodeBlockSizes`.

Legend: B batch, H heads, S cache positions, L kv_lora_rank (latent), R rope dim, W = L + R,
P parts (splits), bs block of positions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


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


def decode_call(q, cache, lengths, kv_lora_rank, softmax_scale, bs, interpret):
  """Normalised partial outputs [B, P, H, L] f32 and their log-sum-exps [B, P, H, 1] f32."""
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
  return o_parts, lse_parts
