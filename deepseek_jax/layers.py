"""Building blocks shared by attention, MoE and the model: linear projections (with optional LoRA
adapters and a quantized frozen kernel), the embedding, RMSNorm, SwiGLU MLP, RoPE with YaRN.

LoRA (Hu et al. 2021) on a projection W [in, out]:  y = x W + (x A) B · alpha / r,  with A [in, r]
random and B [r, out] zero at the start, so a fresh adapter leaves the model exactly as it was.
Adapters are `LoRAParam` variables: what a LoRA fine-tune trains, and nothing else.

Legend: B batch, T query length, S key length, D hidden, H heads, R rope dims, I MLP width,
r LoRA rank.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax import quant
from deepseek_jax.config import DeepseekConfig, yarn_mscale

Dtype = jnp.dtype


class LoRAParam(nnx.Param):
  """A LoRA adapter matrix (A or B): the variables a LoRA fine-tune trains. Always float32 (the
  master weights of training), whatever the frozen base is stored in."""


def param_key(rngs: nnx.Rngs) -> jax.Array:
  """The next key of the `params` stream: the same key as `rngs.params()`, drawn eagerly where
  the stream's counter is concrete (`model.seeded_model` traced, with `model.CONCRETE_KEYS`), so
  that the counter never becomes a tracer: before jax 0.12 each update of a traced counter cost
  a walk over the whole trace so far (see `model.CONCRETE_KEYS`)."""
  with jax.ensure_compile_time_eval():
    return rngs.params()


def dense_init(cfg: DeepseekConfig):
  return nnx.initializers.normal(stddev=cfg.initializer_range)


def lora_init(d_in: int):
  """A's initialisation: Kaiming-uniform with a = sqrt(5) as in the LoRA paper's code, i.e.
  U(-1/sqrt(in), 1/sqrt(in)); B starts at zero."""
  bound = 1.0 / math.sqrt(d_in)
  return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def frozen_weight(cfg: DeepseekConfig, shape: tuple[int, ...], init, rngs: nnx.Rngs, param_dtype,
                  *, rows: bool = False) -> tuple[nnx.Param, nnx.Param | None]:
  """(weight, scale): an initialised float weight, or with `cfg.weight_quant` its stored form
  (zeros: quantized bases come from checkpoints) and a float32 scale (see `quant`)."""
  if cfg.weight_quant == "none":
    return nnx.Param(init(param_key(rngs), shape, param_dtype)), None
  mode = cfg.weight_quant
  return (nnx.Param(jnp.zeros(shape, quant.storage_dtype(mode))),
          nnx.Param(jnp.ones(quant.scale_shape(shape, mode, rows=rows), jnp.float32)))


class Linear(nnx.Module):
  """y = x W + b, W [in, out] (the released `weight`, transposed), named by its place in the layer
  (`name`, e.g. "self_attn.q_a_proj"): the name decides whether it carries a LoRA adapter
  (`cfg.has_lora`); with `cfg.weight_quant` W is stored quantized and dequantized when used."""

  def __init__(self, cfg: DeepseekConfig, d_in: int, d_out: int, *, name: str, bias: bool = False,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.quant = cfg.weight_quant
    self.dtype = dtype
    self.kernel, scale = frozen_weight(cfg, (d_in, d_out), dense_init(cfg), rngs, param_dtype)
    if scale is not None:
      self.kernel_scale = scale
    if bias:
      self.bias = nnx.Param(jnp.zeros((d_out,), param_dtype))
    self.lora_scale = cfg.lora_scale if cfg.has_lora(name) else 0.0
    if self.lora_scale:
      r = cfg.lora_rank
      self.lora_a = LoRAParam(lora_init(d_in)(param_key(rngs), (d_in, r), jnp.float32))
      self.lora_b = LoRAParam(jnp.zeros((r, d_out), jnp.float32))

  def base_kernel(self, dtype=None) -> jax.Array:
    """W [in, out] (dequantized) in `dtype` (default: the compute dtype), without the adapter."""
    dtype = dtype or self.dtype
    if self.quant == "none":
      return self.kernel[...].astype(dtype)
    return quant.dequantize(self.kernel[...], self.kernel_scale[...], self.quant, dtype)

  def merged_kernel(self, dtype=None) -> jax.Array:
    """W + A B · alpha/r [in, out]: the weight the layer applies (for paths that need it whole,
    and for merging the adapter into the weights)."""
    dtype = dtype or self.dtype
    w = self.base_kernel(dtype)
    if self.lora_scale:
      w = w + (self.lora_a[...].astype(dtype) @ self.lora_b[...].astype(dtype)) * self.lora_scale
    return w

  def __call__(self, x: jax.Array) -> jax.Array:  # [..., in] -> [..., out]
    x = x.astype(self.dtype)
    y = jax.lax.dot_general(x, self.base_kernel(), (((x.ndim - 1,), (0,)), ((), ())))
    if hasattr(self, "bias"):
      y = y + self.bias[...].astype(self.dtype)
    if self.lora_scale:
      a, b = self.lora_a[...].astype(self.dtype), self.lora_b[...].astype(self.dtype)
      y = y + ((x @ a) @ b) * self.lora_scale
    return y


def linear(cfg: DeepseekConfig, d_in: int, d_out: int, *, name: str, bias: bool = False, dtype,
           param_dtype, rngs: nnx.Rngs) -> Linear:
  """A [in, out] projection initialised like the release (normal, std initializer_range)."""
  return Linear(cfg, d_in, d_out, name=name, bias=bias, dtype=dtype, param_dtype=param_dtype,
                rngs=rngs)


class Embed(nnx.Module):
  """Token embedding [V, D] (`embedding`), stored per-row quantized with `cfg.weight_quant`."""

  def __init__(self, cfg: DeepseekConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.quant = cfg.weight_quant
    self.dtype = dtype
    self.embedding, scale = frozen_weight(
        cfg, (cfg.vocab_size, cfg.hidden_size),
        nnx.initializers.normal(cfg.initializer_range), rngs, param_dtype, rows=True)
    if scale is not None:
      self.embedding_scale = scale

  def table(self, dtype=None) -> jax.Array:
    """The whole [V, D] table in `dtype` (default: the compute dtype; a tied head reads it)."""
    dtype = dtype or self.dtype
    if self.quant == "none":
      return self.embedding[...].astype(dtype)
    return quant.dequantize(self.embedding[...], self.embedding_scale[...], self.quant, dtype,
                            rows=True)

  def __call__(self, ids: jax.Array) -> jax.Array:  # [...] int -> [..., D]
    rows = jnp.take(self.embedding[...], ids, axis=0)
    if self.quant == "none":
      return rows.astype(self.dtype)
    return quant.dequantize(rows, jnp.take(self.embedding_scale[...], ids, axis=0), self.quant,
                            self.dtype, rows=True)


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
  """SwiGLU: down(silu(gate(x)) * up(x)); the dense layers ("mlp") and the shared experts
  ("mlp.shared_experts"), `name` prefixing its projections' names."""

  def __init__(self, cfg: DeepseekConfig, intermediate_size: int, *, name: str = "mlp",
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = linear(cfg, cfg.hidden_size, intermediate_size, name=f"{name}.gate_proj", **kw)
    self.up_proj = linear(cfg, cfg.hidden_size, intermediate_size, name=f"{name}.up_proj", **kw)
    self.down_proj = linear(cfg, intermediate_size, cfg.hidden_size, name=f"{name}.down_proj",
                            **kw)

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
