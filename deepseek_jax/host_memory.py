"""Transparent huge pages for the host memory of XLA:CPU programs that run many times (training).

Why: XLA:CPU allocates all of one execution's temporaries as one buffer, with `posix_memalign` from
a worker thread. glibc serves a request that large (above 32 MB at most; a worker thread's arena
holds nothing over 64 MB) with an `mmap` of its own and gives it back with `munmap` when it is
freed, so every execution faults all its pages in again, 4 KiB at a time. The tiny training step of
bench/train.py (8 heads) allocates 209 MiB per step this way: about 54,000 page faults a step.
Where the kernel gives transparent huge pages on request
(`/sys/kernel/mm/transparent_hugepage/enabled` is `madvise`, a common default), glibc's tunable
`glibc.malloc.hugetlb=1` (glibc 2.35 and later) makes malloc request them
(`madvise(MADV_HUGEPAGE)`) for its mappings: about 1,000 faults a step, and the step took 222-234
ms against 266-288 ms on this 2-core VM (three runs each). Our prefill and decode, whose
temporaries fit the arenas, measured the same with and without, and bench/grpo.py's GRPO step
(sampling and a small update) slower with them: 0.159-0.163 s against 0.131-0.145 s, three runs
each. PyTorch's CPU allocator has a switch of its own for the same (`THP_MEM_ALLOC_ENABLE=1`).

glibc reads its tunables only when a process starts, so `reexec_with_huge_pages` runs the same
command again (same interpreter, arguments and working directory) with the tunable added to
`GLIBC_TUNABLES`, before the command does anything. The training CLI does this
(`cli.run(main, huge_pages=True)` in `deepseek_jax.train`); a script of one's own can call it
first thing. A notebook
kernel is never re-executed: start its process with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`.
Nothing happens where the tunable is already set, the kernel gives huge pages always or never,
the C library is not glibc 2.35 or later, or `DEEPSEEK_JAX_HUGE_PAGES=0`.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "DEEPSEEK_JAX_HUGE_PAGES"  # "0": never re-execute
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def transparent_huge_pages(path: str = THP_ENABLED) -> str | None:
  """The kernel's transparent huge page mode ("always", "madvise" or "never"); None where the
  file is missing or unreadable (not Linux, or a kernel without THP)."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def _glibc_at_least(version: str, minimum: tuple[int, int] = (2, 35)) -> bool:
  try:
    return tuple(int(p) for p in version.split(".")[:2]) >= minimum
  except ValueError:
    return False


def huge_pages_environ(environ: Mapping[str, str], *, thp: str | None,
                       libc: tuple[str, str]) -> dict[str, str] | None:
  """The environment to run this process again with, so that glibc asks for huge pages; None
  where that would change nothing (see the module docstring)."""
  tunables = environ.get("GLIBC_TUNABLES", "")
  if (environ.get(OPT_OUT) == "0" or thp != "madvise" or libc[0] != "glibc"
      or not _glibc_at_least(libc[1]) or TUNABLE in tunables):
    return None
  return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, (tunables, f"{TUNABLE}=1")))}


def reexec_with_huge_pages() -> None:
  """Runs this command again with glibc's huge-page tunable where it is not yet in effect (see
  the module docstring); returns where nothing is to be done. Call it before any work."""
  if (sys.platform != "linux" or not sys.executable or len(getattr(sys, "orig_argv", ())) < 2
      or "ipykernel" in sys.modules):
    return
  env = huge_pages_environ(os.environ, thp=transparent_huge_pages(), libc=platform.libc_ver())
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
