"""Safetensors files read directly on the format, whole tensors or slices of them.

Format: 8-byte little-endian header length N, then N bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, offsets relative
to the data section), then the data section (row-major, little-endian tensors).

Why our own reader: safetensors' numpy backend cannot read F8_E4M3, and we need reads of a row range
or of a sub-block of a tensor that touch only those bytes. Reads use `os.preadv` into fresh buffers
(the page cache is not mapped into the process, so peak RSS is what the caller keeps);
`SafetensorsFile.view` gives a zero-copy memory-mapped array for callers who want one.

Never unpickles: `*.bin`, `*.pt`, `*.pth`, `*.ckpt` checkpoints are refused with a clear error.
Writing lives in `safetensors_write`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import struct

import numpy as np

from deepseek_jax.dtypes import SAFETENSORS as DTYPES
from deepseek_jax.json_file import read_json_object

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_MAX_HEADER = 100 * 2**20      # the format's own limit on the JSON header
_CHUNK = 64 * 2**20            # bytes read at once when slicing inside rows


class SafetensorsError(ValueError):
  """A malformed safetensors file, index or directory (the message names the file and tensor)."""


class PickleCheckpointError(SafetensorsError):
  """A pickle checkpoint: refused, never unpickled."""


def refuse_pickle(path: str) -> None:
  """Raises PickleCheckpointError when `path` names a pickle checkpoint."""
  if path.lower().endswith(PICKLE_SUFFIXES):
    raise PickleCheckpointError(
        f"{path}: pickle checkpoints are not loaded (unpickling runs arbitrary code); convert it "
        "to safetensors first, e.g. with transformers' save_pretrained(safe_serialization=True)")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """Where one tensor lives: byte range [begin, end) in the file (absolute offsets)."""
  name: str
  dtype: str                   # safetensors name
  shape: tuple[int, ...]
  begin: int
  end: int
  file: str

  @property
  def np_dtype(self) -> np.dtype:
    return DTYPES[self.dtype]

  @property
  def nbytes(self) -> int:
    return self.end - self.begin


def _normalize_index(index, shape: tuple[int, ...], where: str) -> tuple[slice, ...]:
  """A tuple of step-1 slices (ints become length-1 slices; they are squeezed by the caller)."""
  if index is None:
    index = ()
  if not isinstance(index, tuple):
    index = (index,)
  if len(index) > len(shape):
    raise IndexError(f"{where}: index {index} has more entries than shape {shape}")
  out = []
  for i, (ix, n) in enumerate(zip(index + (slice(None),) * (len(shape) - len(index)), shape)):
    if isinstance(ix, (int, np.integer)):
      j = int(ix) + n if ix < 0 else int(ix)
      if not 0 <= j < n:
        raise IndexError(f"{where}: index {ix} out of range for axis {i} of size {n}")
      out.append(slice(j, j + 1))
    elif isinstance(ix, slice):
      start, stop, step = ix.indices(n)
      if step != 1:
        raise IndexError(f"{where}: only step-1 slices are read (axis {i} has step {step})")
      out.append(slice(start, max(start, stop)))
    else:
      raise IndexError(f"{where}: unsupported index {ix!r} on axis {i}")
  return tuple(out)


def _pread_into(fd: int, buf: np.ndarray, offset: int, path: str) -> None:
  view = memoryview(buf.reshape(-1).view(np.uint8))
  done = 0
  while done < len(view):
    n = os.preadv(fd, [view[done:]], offset + done)
    if n <= 0:
      raise SafetensorsError(f"{path}: unexpected end of file at byte {offset + done}")
    done += n


class SafetensorsFile:
  """One safetensors file: its header validated on open, tensors read whole or in slices."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    refuse_pickle(self.path)
    self._fd = os.open(self.path, os.O_RDONLY)
    self._mmap: mmap.mmap | None = None
    try:
      self.tensors, self.metadata = self._read_header()
    except BaseException:
      os.close(self._fd)
      self._fd = -1
      raise

  def _read_header(self) -> tuple[dict[str, TensorInfo], dict]:
    p = self.path
    size = os.fstat(self._fd).st_size
    if size < 8:
      raise SafetensorsError(f"{p}: truncated ({size} bytes; not even the 8-byte header length)")
    (n,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
    if n > _MAX_HEADER:
      raise SafetensorsError(f"{p}: corrupted header (declared length {n} exceeds {_MAX_HEADER})")
    if 8 + n > size:
      raise SafetensorsError(f"{p}: header length {n} is beyond the file size {size} "
                             "(truncated or corrupted file)")
    raw = os.pread(self._fd, n, 8)
    try:
      header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise SafetensorsError(f"{p}: corrupted header (not valid JSON: {e})") from e
    if not isinstance(header, dict):
      raise SafetensorsError(f"{p}: corrupted header (expected a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start, data_size = 8 + n, size - 8 - n
    tensors = {}
    for name, h in header.items():
      where = f"{p}: tensor {name!r}"
      if not isinstance(h, dict) or not {"dtype", "shape", "data_offsets"} <= set(h):
        raise SafetensorsError(f"{where}: header entry needs dtype, shape and data_offsets")
      dt, shape, offs = h["dtype"], h["shape"], h["data_offsets"]
      if dt not in DTYPES:
        raise SafetensorsError(f"{where}: unsupported dtype {dt!r} (known: {sorted(DTYPES)})")
      if (not isinstance(shape, list)
          or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise SafetensorsError(f"{where}: shape {shape!r} is not a list of non-negative ints")
      if (not isinstance(offs, list) or len(offs) != 2
          or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
        raise SafetensorsError(f"{where}: data_offsets {offs!r} is not [begin, end]")
      begin, end = offs
      want = math.prod(shape) * DTYPES[dt].itemsize
      if not 0 <= begin <= end:
        raise SafetensorsError(f"{where}: data_offsets {offs} are not ordered")
      if end - begin != want:
        raise SafetensorsError(f"{where}: data_offsets {offs} hold {end - begin} bytes but shape "
                               f"{tuple(shape)} x {dt} needs {want}")
      if end > data_size:
        raise SafetensorsError(f"{where}: data_offsets {offs} end beyond the data section "
                               f"({data_size} bytes; truncated file?)")
      tensors[name] = TensorInfo(name, dt, tuple(shape), data_start + begin, data_start + end, p)
    spans = sorted((t.begin, t.end, t.name) for t in tensors.values() if t.end > t.begin)
    for (_, e0, a), (b1, _, b) in zip(spans, spans[1:]):
      if b1 < e0:
        raise SafetensorsError(f"{p}: tensors {a!r} and {b!r} overlap in the data section")
    return tensors, metadata

  # ------------------------------------------------------------------ reading
  def info(self, name: str) -> TensorInfo:
    if name not in self.tensors:
      raise KeyError(f"{self.path}: no tensor {name!r}")
    return self.tensors[name]

  def keys(self) -> list[str]:
    return list(self.tensors)

  def read(self, name: str, index=None) -> np.ndarray:
    """Tensor `name`, or `tensor[index]` for step-1 slices / ints, reading only the rows needed.

    The leading axes select whole contiguous runs of rows; slices on later axes are cut from
    row chunks of at most ~64 MB, so memory beyond the result stays bounded.
    """
    t = self.info(name)
    where = f"{self.path}: tensor {name!r}"
    idx = _normalize_index(index, t.shape, where)
    squeeze = tuple(i for i, ix in enumerate(index if isinstance(index, tuple) else (index,))
                    if isinstance(ix, (int, np.integer))) if index is not None else ()
    out = self._read_block(t, idx)
    return out.reshape([n for i, n in enumerate(out.shape) if i not in squeeze]) if squeeze else out

  def _read_block(self, t: TensorInfo, idx: tuple[slice, ...]) -> np.ndarray:
    dt, shape = t.np_dtype, t.shape
    out_shape = tuple(s.stop - s.start for s in idx)
    out = np.empty(out_shape, dt)
    if out.size == 0:
      return out
    # k: the first axis from which the selection is the whole trailing block (contiguous runs).
    k = len(shape)
    while k > 0 and idx[k - 1] == slice(0, shape[k - 1]):
      k -= 1
    if k == 0:  # everything
      _pread_into(self._fd, out, t.begin, self.path)
      return out
    strides = [math.prod(shape[i + 1:]) * dt.itemsize for i in range(len(shape))]
    if k == 1 or all(s.stop - s.start == 1 for s in idx[:k - 1]):
      # One contiguous run: a range along axis k-1 under fixed leading indices.
      off = t.begin + sum(idx[i].start * strides[i] for i in range(k))
      _pread_into(self._fd, out, off, self.path)
      return out
    # Runs along axis 0: read row chunks of axis 0 whole, cut the rest in memory.
    row_bytes = strides[0]
    rows_per_chunk = max(1, _CHUNK // max(row_bytes, 1))
    r0, r1 = idx[0].start, idx[0].stop
    for a in range(r0, r1, rows_per_chunk):
      b = min(r1, a + rows_per_chunk)
      buf = np.empty((b - a,) + shape[1:], dt)
      _pread_into(self._fd, buf, t.begin + a * row_bytes, self.path)
      out[a - r0:b - r0] = buf[(slice(None),) + idx[1:]]
    return out

  def view(self, name: str) -> np.ndarray:
    """A read-only memory-mapped array of the tensor (no copy; pages count in RSS once touched)."""
    t = self.info(name)
    if self._mmap is None:
      self._mmap = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
    return np.frombuffer(self._mmap, t.np_dtype, math.prod(t.shape), t.begin).reshape(t.shape)

  def close(self) -> None:
    if self._mmap is not None:
      try:
        self._mmap.close()
      except BufferError:  # a view is still alive; the mapping goes with it
        pass
      self._mmap = None
    if self._fd >= 0:
      os.close(self._fd)
      self._fd = -1

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __del__(self):
    if getattr(self, "_fd", -1) >= 0:
      try:
        self.close()
      except Exception:  # at interpreter exit `os` may already be gone
        pass


class SafetensorsDir:
  """The tensors of a checkpoint directory: one `model.safetensors`, shards with
  `model.safetensors.index.json`, or (no index) every `*.safetensors` file in it."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    if os.path.isfile(self.path):
      refuse_pickle(self.path)
      self.root = os.path.dirname(os.path.abspath(self.path))
      files = {os.path.basename(self.path): None}
      self._map = None
    elif os.path.isdir(self.path):
      self.root = os.path.abspath(self.path)
      files, self._map = self._discover()
    else:
      raise FileNotFoundError(f"{self.path}: no such file or directory")
    self._files: dict[str, SafetensorsFile] = {}
    self._where: dict[str, str] = {}
    try:
      for fname in files:
        f = self._open(fname)
        for name in f.tensors:
          if self._map is None:
            if name in self._where:
              raise SafetensorsError(f"{self.path}: tensor {name!r} is in both "
                                     f"{self._where[name]} and {fname}")
            self._where[name] = fname
      if self._map is not None:
        for name, fname in self._map.items():
          if name not in self._files[fname].tensors:
            raise SafetensorsError(f"{os.path.join(self.root, INDEX_NAME)}: tensor {name!r} is "
                                   f"mapped to {fname}, which does not contain it")
        self._where = dict(self._map)
    except BaseException:
      self.close()
      raise

  def _discover(self) -> tuple[dict[str, None], dict[str, str] | None]:
    root = self.root
    index = os.path.join(root, INDEX_NAME)
    if os.path.isfile(index):
      return self._read_index(index)
    names = sorted(n for n in os.listdir(root) if n.endswith(".safetensors"))
    if names:
      return dict.fromkeys(names), None
    pickles = sorted(n for n in os.listdir(root) if n.lower().endswith(PICKLE_SUFFIXES)
                     or n.lower().endswith(tuple(s + ".index.json" for s in PICKLE_SUFFIXES)))
    if pickles:
      refuse_pickle(os.path.join(root, pickles[0].removesuffix(".index.json")))
    raise FileNotFoundError(f"{root}: no {SINGLE_NAME}, {INDEX_NAME} or *.safetensors file")

  def _read_index(self, index: str) -> tuple[dict[str, None], dict[str, str]]:
    wm = read_json_object(index, error=SafetensorsError).get("weight_map")
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                           for k, v in wm.items()):
      raise SafetensorsError(f"{index}: needs a 'weight_map' object of tensor name -> file name")
    real_root = os.path.realpath(self.root)
    files: dict[str, None] = {}
    for name, fname in wm.items():
      if fname in files:
        continue
      where = f"{index}: tensor {name!r} -> {fname!r}"
      full = os.path.join(self.root, fname)
      if os.path.isabs(fname) or ".." in fname.replace("\\", "/").split("/"):
        raise SafetensorsError(f"{where}: points outside the checkpoint directory")
      if os.path.commonpath([real_root, os.path.realpath(full)]) != real_root:
        raise SafetensorsError(f"{where}: resolves (through a symlink) outside the checkpoint "
                               "directory")
      refuse_pickle(full)
      if not fname.endswith(".safetensors"):
        raise SafetensorsError(f"{where}: not a .safetensors file")
      if not os.path.isfile(full):
        raise SafetensorsError(f"{where}: shard {full} is missing")
      files[fname] = None
    return files, wm

  def _open(self, fname: str) -> SafetensorsFile:
    if fname not in self._files:
      self._files[fname] = SafetensorsFile(os.path.join(self.root, fname))
    return self._files[fname]

  # ------------------------------------------------------------------ access
  def __contains__(self, name: str) -> bool:
    return name in self._where

  def keys(self) -> list[str]:
    return list(self._where)

  def file(self, name: str) -> SafetensorsFile:
    if name not in self._where:
      raise KeyError(f"{self.path}: tensor {name!r} is missing")
    return self._files[self._where[name]]

  def info(self, name: str) -> TensorInfo:
    return self.file(name).info(name)

  def read(self, name: str, index=None) -> np.ndarray:
    return self.file(name).read(name, index)

  def files(self) -> list[str]:
    return [f.path for f in self._files.values()]

  def close(self) -> None:
    for f in self._files.values():
      f.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
