"""Stdlib-only helpers shared by the peer benchmark scripts, which run inside the peers' own venvs
(so they must not import our package): the shared config, timing, and the one-line JSON report."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_v3_bench.json")
REPORT_PREFIX = "PEER_RESULT "  # the caller finds the result line by this prefix


def load_config(path: str) -> dict:
  """The shared benchmark config (HF config fields, batch, sequence, dtype, optimizer, timing)."""
  with open(path) as f:
    doc = json.load(f)
  for key in ("hf_config", "batch_size", "seq_len", "dtype", "optimizer", "timing"):
    if key not in doc:
      raise ValueError(f"{path}: missing key {key!r}")
  if doc["dtype"] != "float32":
    raise ValueError(f"{path}: dtype {doc['dtype']!r}; the peer benchmarks support float32 only")
  return doc


def median_seconds(fn: Callable[[], object], *, warmup: int, repeats: int,
                   sync: Callable[[object], object]) -> dict:
  """Median (and all) wall seconds of `fn` after `warmup` untimed calls."""
  for _ in range(warmup):
    sync(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - t0)
  return {"median_s": statistics.median(times), "all_s": times}


def versions(dists: tuple[str, ...]) -> dict:
  out = {"python": platform.python_version()}
  for d in dists:
    try:
      out[d] = importlib.metadata.version(d)
    except importlib.metadata.PackageNotFoundError:
      out[d] = None
  return out


def emit(result: dict) -> None:
  """Prints the one result line the caller parses."""
  sys.stdout.write(REPORT_PREFIX + json.dumps(result, default=str) + "\n")
  sys.stdout.flush()
