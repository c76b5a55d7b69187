"""A frozen base stored in low precision, dequantized where it is used (`cfg.weight_quant`).

  int8  symmetric per output channel:  W[..., i, o] = q[..., i, o] * s[..., o],
        s = max_i |W[..., i, o]| / 127 (an all-zero channel gets s = 1);
  fp8   float8_e4m3fn with one scale per 128x128 block of [in, out], exactly DeepSeek-V3's
        released format (`convert.fp8`), so the released FP8 weights are kept as they are.
Embedding tables [V, D] are quantized per row (their "channel" is the row a token reads), with
an int8 or an FP8 row and one float32 scale per row.

Weights are dequantized one layer at a time inside the forward (under jit, a transient per
layer), never as a full-precision copy of the model.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from deepseek_jax.convert import fp8

INT8_MAX = 127.0


def scale_shape(shape: tuple[int, ...], mode: str, *, rows: bool = False) -> tuple[int, ...]:
  """The scale's shape for a weight of `shape` ([..., in, out], or a [V, D] table with `rows`)."""
  if rows:
    return tuple(shape[:-1])
  if mode == "int8":
    return tuple(shape[:-2]) + (shape[-1],)
  return tuple(shape[:-2]) + fp8.scale_shape(tuple(shape[-2:]))


def storage_dtype(mode: str):
  return jnp.int8 if mode == "int8" else fp8.FP8


def quantize(w: jax.Array, mode: str, *, rows: bool = False) -> tuple[jax.Array, jax.Array]:
  """(stored weight, float32 scale) of `w` ([..., in, out]; a [V, D] table with `rows`)."""
  w = jnp.asarray(w, jnp.float32)
  if mode == "fp8" and not rows:
    return fp8.quantize_blocks(w)
  top = INT8_MAX if mode == "int8" else fp8.FP8_MAX
  amax = jnp.max(jnp.abs(w), axis=-1 if rows else -2, keepdims=True)
  scale = jnp.where(amax > 0, amax / top, 1.0)
  q = jnp.clip(w / scale, -top, top)
  q = jnp.round(q).astype(jnp.int8) if mode == "int8" else q.astype(fp8.FP8)
  return q, jnp.squeeze(scale, -1 if rows else -2)


def dequantize(q: jax.Array, scale: jax.Array, mode: str, dtype, *, rows: bool = False
               ) -> jax.Array:
  """The weight in `dtype` from its stored form (see the module docstring)."""
  if mode == "fp8" and not rows:
    return fp8.dequantize_blocks(q, scale, dtype=dtype)
  s = scale[..., None] if rows else scale[..., None, :]
  return (q.astype(jnp.float32) * s).astype(dtype)


def is_table(path: str) -> bool:
  """Whether the variable at `path` is the token embedding table (quantized per row)."""
  return path.endswith("embed_tokens.embedding")


def quantize_flat(flat: Mapping[str, Any], specs: Mapping[str, jax.ShapeDtypeStruct], mode: str
                  ) -> dict[str, Any]:
  """The values `specs` (a quantized model's variables) describe, from float values `flat`:
  each weight whose spec is stored in int8 or FP8 is quantized (its `<path>_scale` beside it);
  weights kept in FP8 with `<path>_scale_inv` (the released blocks) are taken as they are; the
  rest is copied. Variables `flat` has nothing for (adapters) are left out."""
  stored = storage_dtype(mode)
  out = {}
  for path, spec in specs.items():
    if path not in flat or path in out:
      continue
    v = flat[path]
    if jnp.dtype(spec.dtype) != jnp.dtype(stored) or path + "_scale" not in specs:
      out[path] = v
    elif jnp.dtype(v.dtype) == jnp.dtype(stored) and path + fp8.SCALE_SUFFIX in flat:
      out[path], out[path + "_scale"] = v, flat[path + fp8.SCALE_SUFFIX]
    else:
      out[path], out[path + "_scale"] = quantize(v, mode, rows=is_table(path))
  return out
