"""Streaming load of a released-layout safetensors checkpoint into (sharded) jax arrays.

What to build comes from the caller: one target per variable (shape, dtype and sharding, from the
abstract model and the sharding rules). Each parameter is built with
`jax.make_array_from_callback`: the callback reads only the piece of the released tensor(s) that
one device's shard needs (row-range slice reads; for stacked experts, only that shard's experts,
one expert at a time), dequantizes FP8 blocks on the way, and hands the piece over in the released
[out, in] layout. A jitted transpose-and-cast then produces our [in, out] layout with the target
sharding (one device: NumPy transposes and casts on the host, no compile per shape). `iter_hf`
loads parameters ahead of its consumer in threads, within a byte budget. No host ever holds a
whole stacked expert tensor or the whole model: host memory stays within a few tensors.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import logging
import math
import os
from typing import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import DeepseekConfig, read_config_json
from deepseek_jax.convert import fp8, names
from deepseek_jax.convert.safetensors_read import SafetensorsDir, TensorInfo
from deepseek_jax.dtypes import FLOAT_NAMES as _FLOATS
from deepseek_jax.dtypes import count_nonfinite
from deepseek_jax.params import variable_specs

log = logging.getLogger(__name__)

# Parameters loaded concurrently by `iter_hf` (threads; host memory grows by this many tensors).
LOAD_WORKERS = 2

Targets = Mapping[str, jax.ShapeDtypeStruct]  # our path -> shape, dtype and sharding
Progress = Callable[[str, int], None]          # (our parameter path, bytes read for it)


def _perm(transform: str) -> tuple[int, ...] | None:
  """Axis permutation from the released layout (stacked experts: [E, out, in]) to ours."""
  return {names.COPY: None, names.TRANSPOSE: (1, 0), names.EXPERTS: (0, 2, 1)}[transform]


# Tile edge of `swap_last_two`: a 128 x 128 tile of each input and output fits in L1/L2 together.
_TILE = 128


def swap_last_two(a: np.ndarray) -> np.ndarray:
  """A C-contiguous copy of `a` with its last two axes swapped (both layout permutations, [out,
  in] -> [in, out] and [E, out, in] -> [E, in, out], are this).

  Large matrices are copied tile by tile: NumPy's plain strided copy misses the cache on every
  element of a long column (a [16384, 512] bfloat16 matrix: 39 ms plain, 13 ms tiled)."""
  *lead, rows, cols = a.shape
  if rows * cols * a.itemsize < 2**21 or min(rows, cols) < 2 * _TILE:
    return np.ascontiguousarray(np.swapaxes(a, -1, -2))
  out = np.empty((*lead, cols, rows), a.dtype)
  for c in range(0, cols, _TILE):
    for r in range(0, rows, _TILE):
      out[..., c:c + _TILE, r:r + _TILE] = np.swapaxes(a[..., r:r + _TILE, c:c + _TILE], -1, -2)
  return out


def _hf_layout_shape(entry: names.Entry) -> tuple[int, ...]:
  if entry.transform == names.EXPERTS:
    return (len(entry.hf),) + entry.hf_shape()
  return entry.hf_shape()


def _permuted_sharding(sharding: jax.sharding.Sharding, perm, ndim: int):
  """The sharding of the released-layout array whose transpose by `perm` has `sharding`."""
  if perm is None or isinstance(sharding, jax.sharding.SingleDeviceSharding):
    return sharding
  if isinstance(sharding, jax.sharding.NamedSharding):
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    inv = [0] * ndim
    for ours_axis, hf_axis in enumerate(perm):
      inv[hf_axis] = ours_axis
    return jax.sharding.NamedSharding(sharding.mesh,
                                      jax.sharding.PartitionSpec(*(spec[a] for a in inv)))
  return None  # other shardings: transpose on the host inside the callback


@functools.lru_cache(maxsize=None)
def _relayout(perm, dtype, sharding):
  """jit: released layout -> ours (transpose, cast) placed with `sharding`."""
  def f(x):
    x = x if perm is None else jnp.transpose(x, perm)
    return x.astype(dtype)
  return jax.jit(f, out_shardings=sharding)


class HFCheckpoint:
  """A released-layout directory opened for reading, validated against its config up front.

  `config` defaults to the directory's `config.json`. When the config names MTP layers that the
  checkpoint does not hold, the config drops them (one warning), as `from_pretrained` does.
  Every block read is checked for NaN and Inf (FP8 weights and their scales included; one
  reduction per block): a non-finite value raises ValueError naming the tensor, unless
  `allow_nonfinite`.
  """

  def __init__(self, path: str | os.PathLike, config: DeepseekConfig | None = None, *,
               allow_nonfinite: bool = False):
    self.path = os.fspath(path)
    self.allow_nonfinite = allow_nonfinite
    if not os.path.isdir(self.path):
      raise FileNotFoundError(f"{self.path}: not a directory")
    raw = {}
    if config is None or os.path.isfile(os.path.join(self.path, "config.json")):
      raw, source = read_config_json(self.path)  # required unless a config is given
    cfg = config if config is not None else DeepseekConfig.from_hf(raw, _source=source)
    self.block = fp8.block_size(raw) or fp8.DEFAULT_BLOCK
    self.files = SafetensorsDir(self.path)
    try:
      if cfg.num_nextn_predict_layers and not any(names.is_mtp_name(cfg, n)
                                                  for n in self.files.keys()):
        log.warning("%s: config has num_nextn_predict_layers=%d but the checkpoint holds no MTP "
                    "tensors; loading without MTP", self.path, cfg.num_nextn_predict_layers)
        cfg = cfg.replace(num_nextn_predict_layers=0)
      self.cfg = cfg.replace(scan_layers=False)
      self.entries = names.entries(self.cfg)
      self._validate()
    except BaseException:
      self.files.close()
      raise

  # ------------------------------------------------------------------ validation
  def _check(self, name: str, shape: tuple[int, ...], what: str) -> TensorInfo:
    if name not in self.files:
      raise KeyError(f"{self.path}: tensor {name!r} ({what}) is missing")
    t = self.files.info(name)
    if t.shape != tuple(shape):
      raise ValueError(f"{t.file}: tensor {name!r} has shape {t.shape}, expected {tuple(shape)} "
                       f"({what})")
    if t.dtype == "F8_E4M3":
      if len(shape) != 2:
        raise ValueError(f"{t.file}: tensor {name!r} is F8_E4M3 but not 2-D ({what})")
      s_name = fp8.scale_name(name)
      if s_name not in self.files:
        raise KeyError(f"{t.file}: tensor {name!r} is F8_E4M3 but its block scale {s_name!r} is "
                       "missing")
      s = self.files.info(s_name)
      want = fp8.scale_shape(shape, self.block)
      if s.shape != want or s.dtype not in _FLOATS:
        raise ValueError(f"{s.file}: tensor {s_name!r} is {s.dtype}{s.shape}, expected a float "
                         f"scale of shape {want} for {self.block} blocks")
    elif t.dtype not in _FLOATS:
      raise ValueError(f"{t.file}: tensor {name!r} has dtype {t.dtype}, expected a float dtype "
                       f"({', '.join(_FLOATS)} or F8_E4M3 with a scale) ({what})")
    return t

  def _validate(self) -> None:
    used = set()
    for e in self.entries:
      for n in e.hf:
        self._check(n, e.hf_shape(), f"for {e.ours}")
        used.add(n)
        if self.files.info(n).dtype == "F8_E4M3":
          used.add(fp8.scale_name(n))
    for e in names.mtp_copies(self.cfg):  # copies of shared tensors: must be there, not read
      self._check(e.hf[0], e.hf_shape(), f"MTP copy of {e.ours}")
      used.add(e.hf[0])
    unused = sorted(set(self.files.keys()) - used)
    if unused:
      log.warning("%s: %d tensors the config does not use are ignored (first: %s)", self.path,
                  len(unused), ", ".join(unused[:4]))

  # ------------------------------------------------------------------ sizes
  def source_bytes(self, entry: names.Entry) -> int:
    """Bytes of the released tensors (scales included) an entry reads."""
    n = 0
    for name in entry.hf:
      t = self.files.info(name)
      n += t.nbytes
      if t.dtype == "F8_E4M3":
        n += self.files.info(fp8.scale_name(name)).nbytes
    return n

  def is_fp8(self, entry: names.Entry) -> bool:
    return self.files.info(entry.hf[0]).dtype == "F8_E4M3"

  # ------------------------------------------------------------------ reading pieces
  def _finite(self, name: str, values: np.ndarray) -> np.ndarray:
    """`values` (read from tensor `name`) when all finite or allowed; else ValueError."""
    if not self.allow_nonfinite:
      bad = count_nonfinite(values)
      if bad:
        raise ValueError(
            f"{self.files.info(name).file}: tensor {name!r} holds non-finite values ({bad} NaN "
            f"or Inf among the {values.size} read), which give NaN logits. Refusing "
            "(allow_nonfinite=True / --allow_nonfinite to convert it anyway)")
    return values

  def _read_one(self, name: str, index: tuple[slice, ...], keep_fp8: bool,
                out_dtype=None) -> np.ndarray:
    """A block of one released tensor (its layout), checked finite, FP8 dequantized unless kept,
    then cast to `out_dtype` when given."""
    t = self.files.info(name)
    block = self._finite(name, self.files.read(name, index))
    if t.dtype == "F8_E4M3":
      scale = self._finite(fp8.scale_name(name), self.files.read(fp8.scale_name(name)))
      if not keep_fp8:
        rows, cols = index
        block = fp8.dequantize(block, scale, self.block, rows=(rows.start, rows.stop),
                               cols=(cols.start, cols.stop))
    return block if out_dtype is None else block.astype(out_dtype, copy=False)

  def read_block(self, entry: names.Entry, hf_index: tuple[slice, ...], *,
                 keep_fp8: bool = False, out_dtype=None) -> np.ndarray:
    """`hf_index` of the entry's released-layout array (experts stacked [E, out, in]), in
    `out_dtype` (default: as stored, FP8 dequantized to float32 unless kept).

    Stacked experts are read and cast one at a time into the result, so the host holds the
    result plus one expert."""
    shape = _hf_layout_shape(entry)
    idx = tuple(slice(*s.indices(n)[:2]) for s, n in zip(hf_index, shape))
    idx += tuple(slice(0, n) for n in shape[len(idx):])
    if entry.transform != names.EXPERTS:
      return self._read_one(entry.hf[0], idx, keep_fp8, out_dtype)
    e0, e1 = idx[0].start, idx[0].stop
    first = self._read_one(entry.hf[e0], idx[1:], keep_fp8, out_dtype) if e1 > e0 else None
    out = np.empty((e1 - e0,) + tuple(s.stop - s.start for s in idx[1:]),
                   first.dtype if first is not None else (out_dtype or np.float32))
    for e in range(e0, e1):  # one expert in memory at a time beside the output
      out[e - e0] = first if e == e0 else self._read_one(entry.hf[e], idx[1:], keep_fp8, out_dtype)
    return out

  def read_scales(self, entry: names.Entry) -> np.ndarray:
    """The entry's FP8 block scales in our layout (experts: [E, in_blocks, out_blocks])."""
    scales = [self._finite(fp8.scale_name(n), self.files.read(fp8.scale_name(n)))
              .astype(np.float32) for n in entry.hf]
    if entry.transform == names.EXPERTS:
      return np.stack([s.T for s in scales])
    return scales[0].T if entry.transform == names.TRANSPOSE else scales[0]

  # ------------------------------------------------------------------ arrays
  def load(self, entry: names.Entry, sharding: jax.sharding.Sharding, dtype, *,
           keep_fp8: bool = False) -> jax.Array:
    """Our parameter `entry.ours` as a jax array of `dtype` with `sharding` (FP8 kept as float8
    if asked)."""
    perm = _perm(entry.transform)
    hf_shape = _hf_layout_shape(entry)
    target = dtype
    keep = keep_fp8 and self.is_fp8(entry)
    if keep:
      target = jnp.float8_e4m3fn
    hf_sharding = _permuted_sharding(sharding, perm, len(hf_shape))
    # One device (conversion, single-host loads): transpose and cast in NumPy on the host. The
    # jitted relayout below would compile once per distinct tensor shape (tens of compiles for
    # a checkpoint, most of a small conversion's time; bench/convert.py).
    if hf_sharding is None or isinstance(sharding, jax.sharding.SingleDeviceSharding):
      def cb_host(index):
        hf_index = tuple(index[a] for a in np.argsort(perm)) if perm else index
        block = self.read_block(entry, hf_index, keep_fp8=keep, out_dtype=np.dtype(target))
        block = block.astype(np.dtype(target), copy=False)
        return np.ascontiguousarray(block) if perm is None else swap_last_two(block)
      return jax.make_array_from_callback(entry.shape, sharding, cb_host)

    # FP8 and stacked experts are cast piece by piece on the host: the staged released-layout
    # copy is then no larger than the result.
    staged = np.dtype(target) if (entry.transform == names.EXPERTS or self.is_fp8(entry)) else None

    def cb(index):
      return self.read_block(entry, index, keep_fp8=keep, out_dtype=staged)
    raw = jax.make_array_from_callback(hf_shape, hf_sharding, cb)
    if perm is None and raw.dtype == np.dtype(target):
      return raw
    out = _relayout(perm, np.dtype(target), sharding)(raw)
    raw.delete()
    return out

  def close(self) -> None:
    self.files.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def default_targets(cfg: DeepseekConfig, dtype=jnp.bfloat16, *, scanned: bool = False
                    ) -> dict[str, jax.ShapeDtypeStruct]:
  """Every variable on the first device, in the dtype the abstract model gives it for `dtype`
  (unrolled layout unless `scanned`)."""
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return {p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one)
          for p, s in variable_specs(cfg, param_dtype=dtype, scanned=scanned).items()}


def _target_bytes(t: jax.ShapeDtypeStruct) -> int:
  return math.prod(t.shape) * np.dtype(t.dtype).itemsize


def iter_hf(ckpt: HFCheckpoint, targets: Targets, *, keep_fp8: bool = False,
            progress: Progress | None = None, workers: int = LOAD_WORKERS,
            lookahead_bytes: int | None = None) -> Iterator[tuple[str, jax.Array]]:
  """(path, array) per parameter in table order, each as its target says; FP8 kept adds
  `<path>_scale_inv` (our layout).

  A bounded producer/consumer pipeline: `workers` threads read, dequantize, transpose and cast
  parameters ahead of the consumer (the reads, NumPy's transposes and ml_dtypes' casts release
  the GIL). Parameters loaded or loading but not yet taken by the consumer hold at most
  `lookahead_bytes` of targets (at least one parameter: a larger one goes alone); None keeps
  `workers` parameters ahead. A consumer that blocks (an Orbax group being written) so keeps the
  reads going while host memory stays bounded. Errors surface in table order, as loading one
  parameter at a time would raise them; a consumer that stops early (or an error) cancels the
  rest.
  """
  missing = sorted({e.ours for e in ckpt.entries} - set(targets))
  if missing:
    raise KeyError(f"no target for parameters {missing[:4]}")

  def load(entry: names.Entry) -> list[tuple[str, jax.Array]]:
    t = targets[entry.ours]
    sharding = t.sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    out = [(entry.ours, ckpt.load(entry, sharding, t.dtype, keep_fp8=keep_fp8))]
    if keep_fp8 and ckpt.is_fp8(entry):
      out.append((entry.ours + fp8.SCALE_SUFFIX,
                  jax.device_put(ckpt.read_scales(entry), _replicated_like(sharding))))
    return out

  def full(pending, nbytes: int) -> bool:
    if not pending:
      return False
    if lookahead_bytes is None:
      return len(pending) >= max(1, workers)
    return sum(n for _, _, n in pending) + nbytes > lookahead_bytes

  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    entries = iter(ckpt.entries)
    pending: collections.deque = collections.deque()  # (entry, future, target bytes)
    nxt = next(entries, None)
    try:
      while nxt is not None or pending:
        while nxt is not None:
          nbytes = _target_bytes(targets[nxt.ours])
          if full(pending, nbytes):
            break
          pending.append((nxt, pool.submit(load, nxt), nbytes))
          nxt = next(entries, None)
        entry, future, _ = pending.popleft()
        items = future.result()
        yield from items
        del items
        if progress is not None:
          progress(entry.ours, ckpt.source_bytes(entry))
    finally:
      for _, f, _ in pending:  # a consumer that stops early, or an error: do not load the rest
        f.cancel()


def _replicated_like(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  if isinstance(sharding, jax.sharding.SingleDeviceSharding):
    return sharding
  return jax.sharding.SingleDeviceSharding(min(sharding.device_set, key=lambda d: d.id))


def load_hf(path: str | os.PathLike, config: DeepseekConfig | None = None, *,
            targets: Targets | Callable[[DeepseekConfig], Targets] | None = None,
            dtype=jnp.bfloat16, keep_fp8: bool = False, progress: Progress | None = None,
            allow_nonfinite: bool = False) -> tuple[DeepseekConfig, dict[str, jax.Array]]:
  """(config, {our dotted path: jax.Array}) of a released-layout checkpoint directory.

  Args:
    path: directory with `config.json` and `model.safetensors` or shards plus
      `model.safetensors.index.json`.
    config: overrides the directory's `config.json`.
    targets: {path: ShapeDtypeStruct with sharding} per variable (unrolled layout), or a function
      of the checkpoint's config returning them; default `default_targets(cfg, dtype)`.
    dtype: the parameter dtype of the default targets.
    keep_fp8: FP8 weights stay float8_e4m3fn (our layout) with `<path>_scale_inv` float32 block
      scales beside them ([in_blocks, out_blocks], experts [E, in_blocks, out_blocks]).
    progress: called after each parameter with (path, bytes read).
    allow_nonfinite: load NaN / Inf weights or FP8 scales instead of refusing them.

  The returned config has `num_nextn_predict_layers=0` when the checkpoint holds no MTP tensors.
  """
  with HFCheckpoint(path, config, allow_nonfinite=allow_nonfinite) as ckpt:
    if targets is None:
      targets = default_targets(ckpt.cfg, dtype)
    elif callable(targets):
      targets = targets(ckpt.cfg)
    flat = dict(iter_hf(ckpt, targets, keep_fp8=keep_fp8, progress=progress))
    return ckpt.cfg, flat
