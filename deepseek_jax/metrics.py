"""Training metrics: `metrics.jsonl`, TensorBoard event files, the progress bar, and MFU.

`metrics.jsonl` holds one JSON object per logged step; `step` and `loss` are a public contract.
The same scalars go to TensorBoard event files (tensorboardX) under `<workdir>/tensorboard`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Mapping

import tqdm

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
  """Keeps the records with step <= last_step, each step once (its last record) and in step
  order: a run resumed from the checkpoint of `last_step` (0: none was committed) writes the
  steps after it again. Written atomically."""
  if not os.path.isfile(path):
    return
  by_step = {r.get("step", 0): r for r in read_jsonl(path) if r.get("step", 0) <= last_step}
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    for step in sorted(by_step):
      f.write(json.dumps(by_step[step], allow_nan=True) + "\n")
  os.replace(tmp, path)


# ------------------------------------------------------------------------------------ TensorBoard


class EventFileWriter:
  """Scalar summaries as TensorBoard event files under `logdir` (through tensorboardX)."""

  def __init__(self, logdir: str):
    from tensorboardX import SummaryWriter  # a dependency; imported here to keep startup light
    self._w = SummaryWriter(logdir=logdir, flush_secs=10)

  def scalars(self, step: int, values: Mapping[str, Any]) -> None:
    for tag, v in values.items():
      if isinstance(v, (int, float)) and tag not in ("step", "time"):
        self._w.add_scalar(tag, v, global_step=step)

  def close(self) -> None:
    self._w.flush()
    self._w.close()


# ------------------------------------------------------------------------------------ progress


def progress_bar(total: int, *, initial: int = 0, enabled: bool | None = None, **kw):
  """A tqdm bar on stderr (items or, with unit="B", bytes; rate and ETA), shown when `enabled`
  (default: when stderr is a terminal). The one progress bar of training and conversion."""
  enabled = sys.stderr.isatty() if enabled is None else enabled
  return tqdm.tqdm(total=total, initial=initial, disable=not enabled, file=sys.stderr,
                   dynamic_ncols=True, **kw)


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
