"""The one table of dtype names: flags and configs (`float32`, `bfloat16`, ...), safetensors
headers (`F32`, `BF16`, `F8_E4M3`, ...) and `config.json`'s `torch_dtype`, to numpy dtypes."""

from __future__ import annotations

import ml_dtypes
import numpy as np

# Names accepted by --dtype style flags and arguments (parameters and compute).
BY_NAME: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}

# Safetensors dtype name <-> numpy dtype.
SAFETENSORS: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS.items()}
FLOAT_NAMES = ("F64", "F32", "F16", "BF16")  # safetensors float dtypes read as weights
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)


def count_nonfinite(a) -> int:
  """NaN and ±Inf entries of a float array (float8 and bfloat16 included); one pass over it."""
  finite = np.isfinite(np.asarray(a))
  return 0 if finite.all() else int(finite.size - np.count_nonzero(finite))


def from_name(name: str, what: str = "dtype") -> np.dtype:
  """The numpy dtype of a name in BY_NAME; ValueError naming `what` (e.g. a flag) otherwise."""
  if name not in BY_NAME:
    raise ValueError(f"{what}={name!r}: expected one of {sorted(BY_NAME)}")
  return BY_NAME[name]


def name_of(dtype) -> str:
  """`bfloat16`, `float32`, ... for a dtype (numpy's name)."""
  return np.dtype(dtype).name


def safetensors_name(dtype) -> str:
  """The safetensors name of a numpy dtype (`F32`, `BF16`, `F8_E4M3`, ...)."""
  dt = np.dtype(dtype)
  if dt not in _SAFETENSORS_NAMES:
    raise ValueError(f"dtype {dt} has no safetensors equivalent")
  return _SAFETENSORS_NAMES[dt]


def torch_dtype_name(dtype) -> str:
  """`config.json`'s `torch_dtype` for weights stored in `dtype` (bfloat16 unless float32/16)."""
  name = name_of(dtype)
  return name if name in ("float32", "float16") else "bfloat16"
