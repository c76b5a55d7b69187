"""Shared benchmark plumbing: machine and version facts, alternating timed runs, the matmul roof,
and the results files that `bench/run_all.py` assembles into RESULTS.md."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from typing import Callable

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine() -> dict:
  """Processor, its widest vector instructions, cores and the JAX backend this run used."""
  import jax
  info: dict[str, str] = {}  # the first processor's lines
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  cpu = info.get("model name") or platform.processor() or "unknown"
  flags = set(info.get("flags", "").split())
  dev = jax.devices()[0]
  simd = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"))
               if flag in flags), "-")
  return {"cpu": cpu, "vectors": simd, "cores": os.cpu_count(), "backend": jax.default_backend(),
          "device": getattr(dev, "device_kind", str(dev)), "devices": jax.device_count()}


def versions() -> dict:
  out = {"python": sys.version.split()[0]}
  for mod in ("jax", "jaxlib", "flax", "optax", "torch", "transformers"):
    try:
      out[mod] = __import__(mod).__version__
    except Exception:  # a peer may be absent
      out[mod] = None
  return out


def time_alternating(fns: dict[str, Callable[[], object]], *, repeats: int = 5, warmup: int = 1,
                     sync: Callable[[object], object] = lambda x: x) -> dict[str, float]:
  """Median seconds per call of each fn, the fns run in turn (a, b, a, b, …) so that drifts in
  machine load hit every side alike. `sync` blocks on a result (e.g. jax.block_until_ready)."""
  for _ in range(warmup):
    for fn in fns.values():
      sync(fn())
  times: dict[str, list[float]] = {k: [] for k in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      sync(fn())
      times[name].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in times.items()}


def matmul_roof_gflops(dtype: str = "float32", sizes=((4096, 512, 1024), (2048, 2048, 2048),
                                                         (1024, 1024, 1024))) -> dict:
  """The machine's own best dense matmul rate under XLA (the denominator of every MFU here)."""
  import jax
  import jax.numpy as jnp
  best = {"gflops": 0.0}
  for m, k, n in sizes:
    a = jnp.ones((m, k), dtype)
    b = jnp.ones((k, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(f(a, b))
    t0 = time.perf_counter()
    jax.block_until_ready(f(a, b))
    once = time.perf_counter() - t0
    # Sustained, not a burst: enough repeats to fill about two seconds, median of them.
    reps = max(5, int(2.0 / max(once, 1e-4)))
    t = time_alternating({"mm": lambda: f(a, b)}, repeats=reps, sync=jax.block_until_ready)["mm"]
    g = 2 * m * k * n / t / 1e9
    if g > best["gflops"]:
      best = {"gflops": g, "shape": [m, k, n], "dtype": dtype}
  return best


def moe_case(n: int, e: int, d: int, i: int, k: int, seed: int = 0):
  """A routed-experts problem: x [n, d], top-k expert ids [n, k] and weights [n, k], and float32
  expert weights gate/up [e, d, i], down [e, i, d]."""
  import jax.numpy as jnp
  import numpy as np
  r = np.random.RandomState(seed)
  x = jnp.asarray(r.randn(n, d), jnp.float32)
  ws = [jnp.asarray(r.randn(*s) * 0.05, jnp.float32) for s in ((e, d, i), (e, d, i), (e, i, d))]
  idx = jnp.asarray(np.argsort(-r.randn(n, e), -1)[:, :k], jnp.int32)
  w = jnp.asarray(r.rand(n, k), jnp.float32)
  return x, idx, w, ws


def save_result(name: str, result: dict) -> str:
  """Writes bench/results/<name>.json (atomically) for run_all to assemble."""
  os.makedirs(RESULTS_DIR, exist_ok=True)
  path = os.path.join(RESULTS_DIR, f"{name}.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=1, default=str)
  os.replace(tmp, path)
  return path


def table(headers: list[str], rows: list[list]) -> str:
  """A Markdown table."""
  def fmt(v):
    if isinstance(v, float):
      return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)
  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
  return "\n".join(lines)
