"""Flash-decoding over MLA's compressed latent cache (absorbed decode path): one op, a Pallas
kernel per platform, a jnp twin.

In the absorbed form every head attends to the same per-position latent row c = [c_kv (L) | k_rope (R)]:

  scores[b, h, s] = softmax_scale * q[b, h, :] . cache[b, s, :]      over the full L + R width
  out[b, h, :]    = sum_s softmax_s(scores[b, h, s]) * cache[b, s, :L]    for s < lengths[b]

A row with length 0 returns zeros. The kernels split S into `num_splits` parts; each part runs an
online softmax over its blocks and writes a normalised partial output with its log-sum-exp; a
log-sum-exp combine in jnp (`_combine`) merges the parts. Softmax math is float32; the value
product takes the cache dtype with float32 accumulation. Backends (`platform.backend_for`):
`mla_decode_mosaic` on TPUs (and interpreted on the CPU), `mla_decode_triton` on GPUs.

Legend: B batch, H heads, S cache positions, L kv_lora_rank (latent), R rope dim, W = L + R,
P parts (splits), bs block of positions.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from deepseek_jax.kernels_pallas import mla_decode_mosaic, mla_decode_triton
from deepseek_jax.kernels_pallas.platform import backend_for, gpu_device_kind, per_platform


@dataclasses.dataclass(frozen=True)
class DecodeBlockSizes:
  """`block_s` cache positions per step; `num_splits` independent parts of S (flash-decoding);
  GPUs only: `block_h` heads per program and Triton's `num_warps`/`num_stages` (None: Pallas's
  defaults). The Triton kernel rounds block_s and block_h to powers of two of at least 16."""

  block_s: int = 512
  num_splits: int = 8
  block_h: int = 16
  num_warps: int | None = None
  num_stages: int | None = None

  def __post_init__(self):
    if self.block_s <= 0 or self.block_s % 8:
      raise ValueError(f"DecodeBlockSizes.block_s must be a positive multiple of 8, got {self.block_s}")
    if self.num_splits <= 0:
      raise ValueError(f"DecodeBlockSizes.num_splits must be positive, got {self.num_splits}")
    if self.block_h <= 0:
      raise ValueError(f"DecodeBlockSizes.block_h must be positive, got {self.block_h}")

  @classmethod
  def default(cls, platform: str | None = None, *, interpret: bool = False,
              device_kind: str | None = None) -> DecodeBlockSizes:
    """TPU: 512-position blocks (576 x 512 bf16 = 576 KiB a buffer); interpret: few large steps;
    GPUs: per device kind (`GPU_DECODE_BLOCK_SIZES`)."""
    platform = platform or jax.default_backend()
    if interpret or platform == "cpu":
      return cls(block_s=512, num_splits=2, block_h=64)
    if platform == "tpu":
      return cls(block_s=512, num_splits=8)
    device_kind = device_kind or gpu_device_kind()
    for names, bs in GPU_DECODE_BLOCK_SIZES:
      if device_kind and any(name in device_kind for name in names):
        return bs
    return GPU_DECODE_FALLBACK


# Triton decode blocks per GPU family: 16 heads x 512 latent float32 accumulators per program
# (registers), cache blocks of 64 positions x 576 bf16 (72 KiB) double-buffered in shared memory;
# enough splits that batch x splits x head blocks fills the streaming multiprocessors.
GPU_DECODE_BLOCK_SIZES = (
    (("H100", "H200", "H800", "H20", "GH200", "B200", "B300", "GB200", "GB300"),
     DecodeBlockSizes(block_s=64, num_splits=16, block_h=16, num_warps=4, num_stages=2)),
    (("gfx94", "gfx95", "gfx90a", "MI300", "MI325", "MI355", "MI250", "MI210"),
     DecodeBlockSizes(block_s=64, num_splits=16, block_h=16, num_warps=4, num_stages=1)),
)
GPU_DECODE_FALLBACK = DecodeBlockSizes(block_s=32, num_splits=8, block_h=16, num_warps=4,
                                       num_stages=2)

_BACKENDS = {"mosaic_tpu": mla_decode_mosaic, "triton": mla_decode_triton}


def _combine(o_parts: jax.Array, lse_parts: jax.Array) -> jax.Array:
  """Merge normalised parts [B, P, H, L] with their log-sum-exps [B, P, H, 1] -> [B, H, L] f32."""
  m = jnp.max(lse_parts, axis=1, keepdims=True)  # [B, 1, H, 1]
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  w = jnp.exp(lse_parts - m)  # [B, P, H, 1]; 0 for empty parts
  total = jnp.sum(w, axis=1)  # [B, H, 1]
  out = jnp.einsum("bphl,bph->bhl", o_parts, w[..., 0])
  return jnp.where(total > 0, out / jnp.where(total > 0, total, 1.0), 0.0)


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


def _decode_call(q, cache, lengths, kv_lora_rank, softmax_scale, bs, interpret, backend):
  o_parts, lse_parts = _BACKENDS[backend].decode_call(q, cache, lengths, kv_lora_rank,
                                                      softmax_scale, bs, interpret)
  return _combine(o_parts, lse_parts).astype(q.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _decode(q, cache, lengths, kv_lora_rank, softmax_scale, bs, interpret, backend):
  return _decode_call(q, cache, lengths, kv_lora_rank, softmax_scale, bs, interpret, backend)


def _decode_fwd(q, cache, lengths, kv_lora_rank, softmax_scale, bs, interpret, backend):
  out = _decode_call(q, cache, lengths, kv_lora_rank, softmax_scale, bs, interpret, backend)
  return out, (q, cache, lengths)


def _decode_bwd(kv_lora_rank, softmax_scale, bs, interpret, backend, res, g):
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
                         interpret=None, backend: str | None = None) -> jax.Array:
  """Absorbed-MLA decode attention: q [B, H, L+R], cache [B, S, L+R], lengths [B] -> [B, H, L].

  Positions >= lengths[b] are masked (lengths past S are cut at S); rows of length 0 give zeros.
  Output dtype is q's. Differentiable (backward through the reference; meant for checks only).
  `interpret=None` interprets where the program is lowered for the CPU (`per_platform`); the
  backend ("mosaic_tpu" or "triton") and block sizes follow that platform unless given.
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
    be = backend_for(platform, backend)
    bs = block_sizes
    if bs is None:
      bs = DecodeBlockSizes.default("gpu" if be == "triton" and not interp else platform,
                                    interpret=bool(interp))
    return _decode(q, cache, lengths, kv_lora_rank, float(softmax_scale), bs, interp, be)
  return per_platform(run, interpret)
