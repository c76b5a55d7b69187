"""Safetensors files written directly on the format: one tensor in memory at a time, sharded
checkpoints with their index, every output appearing atomically."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import struct
from typing import Callable, Mapping, Sequence

import numpy as np

from deepseek_jax.convert.atomic import commit_output, prepare_output
from deepseek_jax.convert.safetensors_read import INDEX_NAME, SINGLE_NAME, SafetensorsError
from deepseek_jax.dtypes import safetensors_name


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """A tensor to write: its name, dtype and shape (the data is produced later, one at a time)."""
  name: str
  dtype: np.dtype
  shape: tuple[int, ...]

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def _header_bytes(specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None) -> bytes:
  header: dict = {}
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  off = 0
  for s in specs:
    header[s.name] = {"dtype": safetensors_name(s.dtype), "shape": list(s.shape),
                      "data_offsets": [off, off + s.nbytes]}
    off += s.nbytes
  raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
  raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
  return struct.pack("<Q", len(raw)) + raw


def write_file(path: str, specs: Sequence[TensorSpec], produce: Callable[[TensorSpec], np.ndarray],
               metadata: Mapping[str, str] | None = None,
               on_tensor: Callable[[TensorSpec], None] | None = None) -> None:
  """Writes one safetensors file, asking `produce` for each tensor in turn (one in memory at once)."""
  with open(path, "wb") as f:
    f.write(_header_bytes(specs, metadata))
    for s in specs:
      a = np.asarray(produce(s))
      if a.shape != tuple(s.shape) or a.dtype != np.dtype(s.dtype):
        raise SafetensorsError(f"{path}: tensor {s.name!r} was produced as {a.dtype}{a.shape}, "
                               f"expected {np.dtype(s.dtype)}{tuple(s.shape)}")
      f.write(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)
      if on_tensor is not None:
        on_tensor(s)


def save_file(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
              metadata: Mapping[str, str] | None = None) -> None:
  """Writes a dict of arrays as one safetensors file (atomically)."""
  path = os.fspath(path)
  specs = [TensorSpec(k, np.asarray(v).dtype, tuple(np.shape(v))) for k, v in tensors.items()]
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    write_file(tmp, specs, lambda s: tensors[s.name], metadata)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def parse_size(size: str | int) -> int:
  """`5GB`, `500MB`, `2GiB`, `1000` (bytes) -> bytes (decimal units as transformers uses them)."""
  if isinstance(size, int):
    return size
  s = size.strip().upper().replace(" ", "")
  units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
           "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
  for u, m in units.items():
    if s.endswith(u):
      try:
        return int(float(s[:-len(u)]) * m)
      except ValueError:
        break
  try:
    return int(s)
  except ValueError:
    raise ValueError(f"size {size!r}: expected a number of bytes or e.g. '5GB', '500MB'") from None


def plan_shards(specs: Sequence[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
  """Greedy split in order: a new shard starts when the next tensor would pass the limit
  (a single tensor larger than the limit gets a shard of its own)."""
  shards: list[list[TensorSpec]] = []
  size = 0
  for s in specs:
    if not shards or (size + s.nbytes > max_shard_size and shards[-1]):
      shards.append([])
      size = 0
    shards[-1].append(s)
    size += s.nbytes
  return shards


def write_sharded(output_dir: str | os.PathLike, specs: Sequence[TensorSpec],
                  produce: Callable[[TensorSpec], np.ndarray], *, max_shard_size: int | str = "5GB",
                  overwrite: bool = False, extra_files: Mapping[str, str | bytes] | None = None,
                  metadata: Mapping[str, str] | None = None,
                  on_tensor: Callable[[TensorSpec], None] | None = None) -> list[str]:
  """Writes tensors as `model.safetensors` or `model-0000i-of-0000n.safetensors` shards plus
  `model.safetensors.index.json`, and `extra_files` (name -> text), all appearing at once.

  Tensors are produced one at a time, so memory holds one tensor, whatever the shard size.
  Returns the shard file names. On any error nothing is left behind.
  """
  output_dir = os.fspath(output_dir)
  names = [s.name for s in specs]
  if len(set(names)) != len(names):
    raise SafetensorsError(f"{output_dir}: duplicate tensor names to write")
  shards = plan_shards(specs, parse_size(max_shard_size))
  n = len(shards)
  fnames = ([SINGLE_NAME] if n == 1 else
            [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
  tmp = prepare_output(output_dir, overwrite)
  try:
    weight_map = {}
    for fname, shard in zip(fnames, shards):
      write_file(os.path.join(tmp, fname), shard, produce, metadata or {"format": "pt"}, on_tensor)
      weight_map.update({s.name: fname for s in shard})
    if n > 1:
      index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
      with open(os.path.join(tmp, INDEX_NAME), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
    for name, content in (extra_files or {}).items():
      with open(os.path.join(tmp, name), "wb") as f:
        f.write(content.encode("utf-8") if isinstance(content, str) else content)
    commit_output(tmp, output_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return fnames
