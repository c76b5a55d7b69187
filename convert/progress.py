"""A one-line progress bar on stderr: items done/total, bytes, throughput and ETA (by bytes)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def human_bytes(n: float) -> str:
  for unit in ("B", "KB", "MB", "GB", "TB"):
    if abs(n) < 1000 or unit == "TB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
    n /= 1000
  return f"{n:.1f} TB"


def _clock(seconds: float) -> str:
  s = int(seconds)
  return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


class ProgressBar:
  """`update(nbytes)` after each item; redraws at most every `interval` seconds and at the end."""

  def __init__(self, total_items: int, total_bytes: int, *, what: str = "tensors",
               stream: TextIO | None = None, interval: float = 0.2, width: int = 28,
               enabled: bool = True):
    self.total_items, self.total_bytes = total_items, max(total_bytes, 1)
    self.what, self.stream, self.interval, self.width = what, stream or sys.stderr, interval, width
    self.enabled = enabled
    self.items = self.bytes = 0
    self.start = time.perf_counter()
    self._last = 0.0

  def line(self) -> str:
    elapsed = max(time.perf_counter() - self.start, 1e-9)
    frac = min(self.bytes / self.total_bytes, 1.0)
    filled = int(frac * self.width)
    rate = self.bytes / elapsed
    eta = (self.total_bytes - self.bytes) / rate if rate > 0 else 0.0
    bar = "#" * filled + "." * (self.width - filled)
    return (f"[{bar}] {self.items}/{self.total_items} {self.what}  {human_bytes(self.bytes)}"
            f"/{human_bytes(self.total_bytes)}  {human_bytes(rate)}/s  ETA {_clock(eta)}")

  def update(self, nbytes: int, items: int = 1) -> None:
    self.items += items
    self.bytes += nbytes
    now = time.perf_counter()
    if self.enabled and (now - self._last >= self.interval or self.items >= self.total_items):
      self._last = now
      self.stream.write("\r" + self.line())
      self.stream.flush()

  def close(self) -> None:
    if self.enabled:
      self.stream.write("\r" + self.line() + f"  done in {_clock(time.perf_counter() - self.start)}\n")
      self.stream.flush()
