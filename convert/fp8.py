"""DeepSeek-V3's FP8 block quantization of linear weights, as its reference inference code does it.

A weight W [out, in] is stored as float8_e4m3fn next to `<name>_scale_inv` (float32
[ceil(out/b0), ceil(in/b1)], b = 128×128 in the release): the real weight is
W.astype(float32) * scale_inv[r // b0, c // b1] (partial edge blocks use their block's scale).
Quantization divides each block by amax/448 (448 = e4m3's largest finite value).

All FP8 (de)quantization lives here: numpy for the released [out, in] layout while converting,
and jnp for our [..., in, out] layout (`quantize_blocks`, `dequantize_blocks`: a frozen FP8 base
dequantized inside the forward; `dequantize_kept`: weights our checkpoints kept in FP8).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from deepseek_jax.dtypes import FP8
FP8_MAX = 448.0
DEFAULT_BLOCK = (128, 128)
SCALE_SUFFIX = "_scale_inv"


def scale_name(weight_name: str) -> str:
  """`…proj.weight` -> `…proj.weight_scale_inv`."""
  return weight_name + SCALE_SUFFIX


def scale_shape(shape: tuple[int, int], block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[int, int]:
  return (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))


def block_size(config: Mapping[str, Any] | None) -> tuple[int, int] | None:
  """The weight block of a `config.json` dict's `quantization_config`, or None when unquantized.

  Raises ValueError for a quantization the converter does not read (not fp8 e4m3 blocks).
  """
  q = (config or {}).get("quantization_config")
  if not q:
    return None
  if q.get("quant_method", "fp8") != "fp8" or q.get("fmt", "e4m3") != "e4m3":
    raise ValueError(f"quantization_config {q!r}: only fp8 e4m3 block quantization is supported")
  b = q.get("weight_block_size", list(DEFAULT_BLOCK))
  if not (isinstance(b, (list, tuple)) and len(b) == 2 and all(isinstance(x, int) and x > 0 for x in b)):
    raise ValueError(f"quantization_config.weight_block_size={b!r}: expected two positive ints")
  return (b[0], b[1])


def quantization_config(block: tuple[int, int] = DEFAULT_BLOCK) -> dict[str, Any]:
  """The `quantization_config` entry the release's config.json carries."""
  return {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
          "weight_block_size": list(block)}


def dequantize(w: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int] = DEFAULT_BLOCK, *,
               rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None
               ) -> np.ndarray:
  """float32 weight of `w` (float8 [r, c]), a block of the full weight starting at row
  `rows[0]` and column `cols[0]` (default: the whole weight), scaled by the full `scale_inv`."""
  r0 = 0 if rows is None else rows[0]
  c0 = 0 if cols is None else cols[0]
  nr, nc = w.shape
  out = w.astype(np.float32)
  s = np.asarray(scale_inv, np.float32)
  s = s[(np.arange(r0, r0 + nr) // block[0])]           # [nr, ceil(in/b1)]
  s = s[:, (np.arange(c0, c0 + nc) // block[1])]        # [nr, nc]
  out *= s
  return out


def quantize(w: np.ndarray, block: tuple[int, int] | int = DEFAULT_BLOCK) -> tuple[np.ndarray, np.ndarray]:
  """(float8_e4m3fn weight, float32 scale_inv) of a 2-D weight, one scale per block (amax / 448).

  An all-zero block gets scale 1 (its weights stay zero).
  """
  if isinstance(block, int):
    block = (block, block)
  w = np.asarray(w, np.float32)
  if w.ndim != 2:
    raise ValueError(f"quantize: expected a 2-D weight, got shape {w.shape}")
  out_dim, in_dim = w.shape
  sr, sc = scale_shape(w.shape, block)
  padded = np.zeros((sr * block[0], sc * block[1]), np.float32)
  padded[:out_dim, :in_dim] = w
  blocks = padded.reshape(sr, block[0], sc, block[1])
  amax = np.abs(blocks).max(axis=(1, 3))                 # [sr, sc]
  scale_inv = np.where(amax > 0, amax / FP8_MAX, 1.0).astype(np.float32)
  q = blocks / scale_inv[:, None, :, None]
  q = np.clip(q, -FP8_MAX, FP8_MAX).reshape(padded.shape)[:out_dim, :in_dim]
  return q.astype(FP8), scale_inv


def dequantize_blocks(w, scale_inv, block: tuple[int, int] = DEFAULT_BLOCK, dtype=jnp.float32):
  """Our layout: W[..., i, o] = w[..., i, o] * scale_inv[..., i // b0, o // b1] (jnp, any leading
  dims: stacked experts or layers), in `dtype`."""
  n_in, n_out = w.shape[-2:]
  want = scale_shape((n_in, n_out), block)
  if tuple(scale_inv.shape[-2:]) != want:
    raise ValueError(f"FP8 block scales of shape {tuple(scale_inv.shape)} do not fit a weight "
                     f"{tuple(w.shape)} in {block[0]}x{block[1]} blocks (expected [..., {want[0]}, "
                     f"{want[1]}])")
  s = jnp.asarray(scale_inv, jnp.float32)
  s = jnp.repeat(jnp.repeat(s, block[0], axis=-2)[..., :n_in, :], block[1], axis=-1)[..., :n_out]
  return (jnp.asarray(w).astype(jnp.float32) * s).astype(dtype)


def quantize_blocks(w, block: tuple[int, int] = DEFAULT_BLOCK):
  """Our layout [..., in, out] -> (float8_e4m3fn weight, float32 scale_inv [..., ceil(in/b0),
  ceil(out/b1)]), one scale per block (amax / 448; an all-zero block gets scale 1). jnp."""
  w = jnp.asarray(w, jnp.float32)
  n_in, n_out = w.shape[-2:]
  sr, sc = scale_shape((n_in, n_out), block)
  lead = w.shape[:-2]
  padded = jnp.pad(w, [(0, 0)] * len(lead) + [(0, sr * block[0] - n_in), (0, sc * block[1] - n_out)])
  blocks = padded.reshape(*lead, sr, block[0], sc, block[1])
  amax = jnp.max(jnp.abs(blocks), axis=(-3, -1))                          # [..., sr, sc]
  scale = jnp.where(amax > 0, amax / FP8_MAX, 1.0)
  q = jnp.clip(blocks / scale[..., :, None, :, None], -FP8_MAX, FP8_MAX)
  q = q.reshape(padded.shape)[..., :n_in, :n_out]
  return q.astype(FP8), scale


def dequantize_kept(flat: Mapping[str, Any], block: tuple[int, int] = DEFAULT_BLOCK
                    ) -> dict[str, Any]:
  """A flat parameter dict with FP8-kept weights replaced by float32 weights (scales dropped).

  Our layout stores a kept weight as float8_e4m3fn `w` [..., in, out] beside `w_scale_inv`
  [..., ceil(in/b0), ceil(out/b1)] (the released blocks, transposed like the weight):
    W[..., i, o] = w[..., i, o] * scale_inv[..., i // b0, o // b1].
  Works on sharded jax arrays (the result keeps the weight's sharding).
  """
  out = {}
  for path, w in flat.items():
    if path.endswith(SCALE_SUFFIX):
      continue
    s = flat.get(path + SCALE_SUFFIX)
    if s is None:
      out[path] = w
      continue
    try:
      out[path] = dequantize_blocks(w, s, block)
    except ValueError as e:
      raise ValueError(f"parameter {path + SCALE_SUFFIX}: {e}") from None
  return out


def is_quantized_name(hf_name: str) -> bool:
  """Whether the release stores this tensor in FP8: the 2-D projection weights of the decoder
  layers (attention, dense MLP, shared and routed experts). Embeddings, the head, norms, the router
  and the MTP-only tensors (`eh_proj`, `shared_head`, `enorm`/`hnorm`) stay in high precision."""
  if not hf_name.startswith("model.layers.") or not hf_name.endswith(
      ("_proj.weight", "_proj_with_mqa.weight")):
    return False
  return ".self_attn." in hf_name or ".mlp." in hf_name
