"""Flash-decoding over MLA's latent cache for GPUs (Pallas, Triton lowering: CUDA and ROCm).

One program per (head block, split, batch row); the head block is grid axis 0, the fastest
launched, so the programs reading the same cache blocks run together and share them in L2. A
program walks its split's cache blocks up to the row's length (a loop with a traced trip count:
blocks past the length are never read), with an online softmax in registers:

  s   = scale * (q_lat . c_lat + q_rope . c_rope)      [bh, bs]  (two dots: L and R are each a
  acc = alpha * acc + softmax-weights @ c_lat           [bh, L]    power of two; L + R is not)

and writes its normalised partial output with its log-sum-exp (`mla_decode` combines them).
Positions at or past the length load as zeros (masked loads: stale or NaN slots are never read)
and score -inf. Triton needs power-of-two blocks of at least 16: heads are padded to whole head
blocks (the query is small), and L or R that is not such a power (tiny test models, never
DeepSeek's 512 + 64) is padded with zero columns.

Legend: B batch, H heads, S cache positions, L kv_lora_rank (latent), R rope dim, P splits,
bh heads per program, bs positions per block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

MIN_BLOCK = 16  # Triton's dot needs every dimension >= 16


def _pow2(x: int) -> int:
  return max(MIN_BLOCK, pl.next_power_of_2(x))


def _decode_kernel(lengths_ref, q_ref, c_ref, o_ref, lse_ref, *, scale: float, latent: int,
                   rope: int, block_h: int, block_s: int, per_split: int, seq_len: int):
  h_i, p, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  length = jnp.minimum(lengths_ref[b], seq_len)
  first = p * per_split
  num_blocks = jnp.clip((length - first + block_s - 1) // block_s, 0, per_split // block_s)
  heads = pl.ds(h_i * block_h, block_h)
  q_lat = q_ref[b, heads, pl.ds(0, latent)]  # [bh, L]
  q_rope = q_ref[b, heads, pl.ds(latent, rope)]  # [bh, R]

  def step(j, carry):
    m, l, acc = carry  # [bh], [bh], [bh, L]
    start = first + j * block_s
    valid = (start + jnp.arange(block_s, dtype=jnp.int32)) < length  # [bs]
    rows = pl.ds(start, block_s)
    c_lat = plgpu.load(c_ref.at[b, rows, pl.ds(0, latent)], mask=valid[:, None], other=0)
    c_rope = plgpu.load(c_ref.at[b, rows, pl.ds(latent, rope)], mask=valid[:, None], other=0)
    nt = (((1,), (1,)), ((), ()))
    s = (jax.lax.dot_general(q_lat, c_lat, nt, preferred_element_type=jnp.float32)
         + jax.lax.dot_general(q_rope, c_rope, nt, preferred_element_type=jnp.float32))  # [bh, bs]
    s = jnp.where(valid[None, :], s * scale, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))  # finite: the block holds a valid position
    alpha = jnp.exp(m - m_new)
    prob = jnp.exp(s - m_new[:, None])
    l = alpha * l + jnp.sum(prob, axis=1)
    pv = jax.lax.dot_general(prob.astype(c_lat.dtype), c_lat, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)  # [bh, L]
    return m_new, l, alpha[:, None] * acc + pv

  init = (jnp.full((block_h,), -jnp.inf, jnp.float32), jnp.zeros((block_h,), jnp.float32),
          jnp.zeros((block_h, latent), jnp.float32))
  m, l, acc = jax.lax.fori_loop(0, num_blocks, step, init)
  seen = l > 0
  safe_l = jnp.where(seen, l, 1.0)
  o_ref[b, p, heads, :] = jnp.where(seen[:, None], acc / safe_l[:, None], 0.0)
  lse_ref[b, p, heads] = jnp.where(seen, m + jnp.log(safe_l), -jnp.inf)


def _pad_columns(x: jax.Array, latent: int, rope: int, latent_p: int, rope_p: int) -> jax.Array:
  """[..., L + R] -> [..., Lp + Rp] with zero columns after each part (no copy when equal)."""
  if (latent, rope) == (latent_p, rope_p):
    return x
  pad = [(0, 0)] * (x.ndim - 1)
  return jnp.concatenate([jnp.pad(x[..., :latent], pad + [(0, latent_p - latent)]),
                          jnp.pad(x[..., latent:], pad + [(0, rope_p - rope)])], axis=-1)


def decode_call(q, cache, lengths, kv_lora_rank, softmax_scale, bs, interpret):
  """Normalised partial outputs [B, P, H, L] f32 and their log-sum-exps [B, P, H, 1] f32."""
  b, h, w = q.shape
  s_len = cache.shape[1]
  latent, rope = kv_lora_rank, w - kv_lora_rank
  latent_p, rope_p = _pow2(latent), _pow2(rope)
  block_h = min(_pow2(bs.block_h), _pow2(h))
  h_p = -(-h // block_h) * block_h
  block_s = min(_pow2(bs.block_s), _pow2(s_len))
  num_blocks = pl.cdiv(s_len, block_s)
  num_splits = min(bs.num_splits, num_blocks)
  per_split = pl.cdiv(num_blocks, num_splits) * block_s
  num_splits = pl.cdiv(s_len, per_split)
  q = _pad_columns(jnp.pad(q, ((0, 0), (0, h_p - h), (0, 0))), latent, rope, latent_p, rope_p)
  cache = _pad_columns(cache, latent, rope, latent_p, rope_p)

  kernel = functools.partial(_decode_kernel, scale=float(softmax_scale), latent=latent_p,
                             rope=rope_p, block_h=block_h, block_s=block_s, per_split=per_split,
                             seq_len=s_len)
  itemsize = jnp.dtype(cache.dtype).itemsize
  cost = pl.CostEstimate(flops=2 * b * h * s_len * (w + latent), transcendentals=b * h * s_len,
                         bytes_accessed=(cache.size + q.size) * itemsize
                         + b * num_splits * h * (latent + 1) * 4)
  o_parts, lse_parts = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((b, num_splits, h_p, latent_p), jnp.float32),
                 jax.ShapeDtypeStruct((b, num_splits, h_p), jnp.float32)),
      grid=(h_p // block_h, num_splits, b),
      compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
      interpret=interpret,
      cost_estimate=cost,
      name="mla_decode_triton",
  )(lengths, q, cache)
  return o_parts[:, :, :h, :latent], lse_parts[:, :, :h, None]
