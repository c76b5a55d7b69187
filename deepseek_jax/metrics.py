"""Training metrics: `metrics.jsonl`, TensorBoard event files, a terminal progress bar, and MFU.

`metrics.jsonl` holds one JSON object per logged step; `step` and `loss` are a public contract.
TensorBoard is not a dependency: `EventFileWriter` writes the event-file format itself (TFRecord
framing with masked CRC-32C, `Event`/`Summary` protocol buffers encoded by hand, scalars only),
which TensorBoard reads as any other run.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import sys
import time
from typing import Any, Mapping

# ------------------------------------------------------------------------------------ JSONL


class JsonlWriter:
  """Appends one JSON object per line to `path`, flushed at once (readable while training)."""

  def __init__(self, path: str):
    self.path = path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self._f = open(path, "a", encoding="utf-8")

  def write(self, record: Mapping[str, Any]) -> None:
    self._f.write(json.dumps(record, allow_nan=True) + "\n")
    self._f.flush()

  def close(self) -> None:
    self._f.close()


def read_jsonl(path: str) -> list[dict]:
  """Every complete record of a metrics file (a line cut by a kill is ignored)."""
  out = []
  if not os.path.isfile(path):
    return out
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.endswith("\n"):
        out.append(json.loads(line))
  return out


def truncate_jsonl(path: str, last_step: int) -> None:
  """Keeps the records with step <= last_step (a resumed run rewrites the steps after its
  checkpoint); written atomically."""
  if not os.path.isfile(path):
    return
  keep = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    for r in keep:
      f.write(json.dumps(r, allow_nan=True) + "\n")
  os.replace(tmp, path)


# ------------------------------------------------------------------------------------ TensorBoard


def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), as TFRecord framing uses."""
  c = 0xFFFFFFFF
  for b in data:
    c = _CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
  return c ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  c = crc32c(data)
  return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  n &= (1 << 64) - 1
  while True:
    b = n & 0x7F
    n >>= 7
    if n:
      out.append(b | 0x80)
    else:
      out.append(b)
      return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int | None = None, *, file_version: str | None = None,
                 scalars: Mapping[str, float] | None = None) -> bytes:
  """An `Event` protocol buffer: wall_time (1, double), step (2, int64), file_version (3,
  string), summary (5) holding `Value`s with tag (1, string) and simple_value (2, float)."""
  msg = bytearray(_varint(1 << 3 | 1) + struct.pack("<d", wall_time))
  if step is not None:
    msg += _varint(2 << 3 | 0) + _varint(int(step))
  if file_version is not None:
    msg += _field_bytes(3, file_version.encode())
  if scalars:
    summary = b"".join(
        _field_bytes(1, _field_bytes(1, tag.encode()) + _varint(2 << 3 | 5)
                     + struct.pack("<f", float(v)))
        for tag, v in scalars.items())
    msg += _field_bytes(5, summary)
  return bytes(msg)


def frame_record(data: bytes) -> bytes:
  """TFRecord framing: length, masked CRC of the length, data, masked CRC of the data."""
  header = struct.pack("<Q", len(data))
  return (header + struct.pack("<I", masked_crc32c(header)) + data
          + struct.pack("<I", masked_crc32c(data)))


class EventFileWriter:
  """Scalar summaries in a TensorBoard event file under `logdir`."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self.path = os.path.join(logdir, name)
    self._f = open(self.path, "ab")
    self._f.write(frame_record(encode_event(time.time(), 0, file_version="brain.Event:2")))
    self._f.flush()

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    finite = {k: v for k, v in values.items() if isinstance(v, (int, float))}
    self._f.write(frame_record(encode_event(time.time(), step, scalars=finite)))
    self._f.flush()

  def close(self) -> None:
    self._f.close()


# ------------------------------------------------------------------------------------ progress


class ProgressBar:
  """A one-line bar on a terminal (stderr); silent when stderr is not a terminal."""

  def __init__(self, total: int, start: int = 0, enabled: bool | None = None):
    self.total, self.start = total, start
    self.enabled = sys.stderr.isatty() if enabled is None else enabled
    self._shown = False

  def update(self, step: int, loss: float, tokens_per_s: float) -> None:
    if not self.enabled:
      return
    frac = step / max(self.total, 1)
    bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
    sys.stderr.write(f"\r[{bar}] {step}/{self.total} loss {loss:.4f} "
                     f"{tokens_per_s:,.0f} tok/s ")
    sys.stderr.flush()
    self._shown = True

  def clear(self) -> None:
    if self._shown:
      sys.stderr.write("\n")
      sys.stderr.flush()
      self._shown = False


# ------------------------------------------------------------------------------------ MFU

# Dense bfloat16 peak FLOP/s per chip, from the vendors' data sheets (no sparsity).
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12, "NVIDIA B200": 2250e12,
}


def device_peak_flops(device_kind: str) -> float | None:
  """The data-sheet peak for a device kind (longest matching prefix), or None if unknown."""
  best = None
  for name, flops in PEAK_FLOPS.items():
    if device_kind.startswith(name) and (best is None or len(name) > len(best[0])):
      best = (name, flops)
  return best[1] if best else None


def measure_matmul_flops(n: int = 4096, k: int = 512, m: int = 1024, seconds: float = 1.0) -> float:
  """The float32 matmul rate of the default device, measured over about `seconds` (FLOP/s).

  Timed as the mean over a sustained run, not the best single call: on a CPU share limited by a
  cgroup quota, short bursts run on more cores than the share allows.
  """
  import jax
  import jax.numpy as jnp

  a = jnp.ones((n, k), jnp.float32)
  b = jnp.ones((k, m), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  t0 = time.perf_counter()
  f(a, b).block_until_ready()
  once = max(time.perf_counter() - t0, 1e-6)
  reps = max(2, int(seconds / once))
  t0 = time.perf_counter()
  for _ in range(reps):
    out = f(a, b)
  out.block_until_ready()
  return 2 * n * k * m * reps / (time.perf_counter() - t0)


def peak_flops_per_device(given: float | None = None) -> tuple[float, str]:
  """(peak FLOP/s of one device, where it came from): given, the data sheet, or measured."""
  import jax

  if given:
    return float(given), "given"
  kind = jax.devices()[0].device_kind
  peak = device_peak_flops(kind)
  if peak is not None:
    return peak, f"data sheet ({kind})"
  return measure_matmul_flops(), f"measured f32 matmul ({kind})"
