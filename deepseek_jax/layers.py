"""Building blocks shared by attention, MoE and the model: RMSNorm, SwiGLU MLP, RoPE with YaRN.

Legend: B batch, T query length, S key length, D hidden, H heads, R rope dims, I MLP width.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax.config import DeepseekConfig, yarn_mscale

Dtype = jnp.dtype


def dense_init(cfg: DeepseekConfig):
  return nnx.initializers.normal(stddev=cfg.initializer_range)


def linear(cfg: DeepseekConfig, d_in: int, d_out: int, *, bias: bool = False, dtype, param_dtype,
           rngs: nnx.Rngs) -> nnx.Linear:
  """A [in, out] projection initialised like the release (normal, std initializer_range)."""
  return nnx.Linear(d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=dense_init(cfg), bias_init=nnx.initializers.zeros_init(), rngs=rngs)


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, with the statistics in float32 whatever the compute dtype."""

  def __init__(self, dim: int, eps: float, *, dtype=jnp.float32, param_dtype=jnp.float32):
    self.eps = eps
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)); the dense layers and the shared experts."""

  def __init__(self, cfg: DeepseekConfig, intermediate_size: int, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = linear(cfg, cfg.hidden_size, intermediate_size, **kw)
    self.up_proj = linear(cfg, cfg.hidden_size, intermediate_size, **kw)
    self.down_proj = linear(cfg, intermediate_size, cfg.hidden_size, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:  # [..., D] -> [..., D]
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


# ----------------------------------------------------------------------------------------- RoPE
def rope_frequencies(cfg: DeepseekConfig) -> tuple[np.ndarray, float]:
  """Inverse frequencies [R/2] and the cos/sin scale ("attention factor") of DeepSeek's RoPE.

  YaRN (Peng et al. 2023) as DeepSeek configures it: dimensions rotating fewer than `beta_slow`
  times over the original context are interpolated by `factor`, those rotating more than
  `beta_fast` times are kept, with a linear ramp between; cos and sin are multiplied by
  mscale(factor, mscale) / mscale(factor, mscale_all_dim) (1 for the released configs). The
  softmax-scale part of YaRN lives in `DeepseekConfig.softmax_scale`.
  """
  dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
  pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
  inv_freq = 1.0 / pos_freqs
  if cfg.rope_type != "yarn":
    return inv_freq.astype(np.float32), 1.0
  factor = cfg.rope_factor

  def correction_dim(rotations: float) -> float:
    return dim * math.log(cfg.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
        2 * math.log(base))

  low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
  high = min(math.ceil(correction_dim(cfg.beta_slow)), dim - 1)
  if low == high:
    high += 0.001  # avoid a zero-width ramp
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  keep = 1.0 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate (divide by factor)
  inv_freq = (inv_freq / factor) * (1 - keep) + inv_freq * keep
  if cfg.mscale and cfg.mscale_all_dim:
    attention_factor = yarn_mscale(factor, cfg.mscale) / yarn_mscale(factor, cfg.mscale_all_dim)
  else:
    attention_factor = yarn_mscale(factor)
  return inv_freq.astype(np.float32), float(attention_factor)


def rope_cos_sin(cfg: DeepseekConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos and sin [B, T, R/2] (float32, attention factor folded in) for integer positions [B, T]."""
  inv_freq, factor = rope_frequencies(cfg)
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, *, interleaved: bool) -> jax.Array:
  """Rotates x [B, T, (H,) R] by cos/sin [B, T, R/2].

  DeepSeek stores rope dimensions as interleaved pairs (x0, x1), (x2, x3), ...; with
  `interleaved=False` the pairs are (x_j, x_{j+R/2}). Either way the output holds the rotated
  first members, then the rotated second members: queries and keys are permuted alike, so their
  dot products equal those of the reference layout.
  """
  if interleaved:
    x1, x2 = x[..., 0::2], x[..., 1::2]
  else:
    x1, x2 = jnp.split(x, 2, axis=-1)
  if x.ndim == cos.ndim + 1:  # per-head input: broadcast over H
    cos, sin = cos[..., None, :], sin[..., None, :]
  x1f, x2f = x1.astype(jnp.float32), x2.astype(jnp.float32)
  out = jnp.concatenate([x1f * cos - x2f * sin, x2f * cos + x1f * sin], axis=-1)
  return out.astype(x.dtype)
