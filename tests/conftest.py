"""The `torch` marker (`@pytest.mark.torch`, `pytestmark`): tests that compare against torch (the
transformers oracle, a torch formula, or safetensors' torch reader). They run on the oldest
supported stack, which has the torch CPU wheel; the current stack (Python 3.12, no torch wheel on
these machines) runs the suite with `-m "not torch"`, so they are counted there as deselected,
never skipped in silence. Tests that only need a released-layout checkpoint on disk are not
marked: without torch, hf_reference.save_hf writes it with numpy.

A torch-less run that still selects a marked test stops at collection, naming it.

Compiles: the session gets one persistent XLA compilation cache (a temporary directory, removed at
exit, unless JAX_COMPILATION_CACHE_DIR is set), which the subprocesses tests start inherit. A
kill-and-restart test compiles its training step three times, a sharded worker each mesh's model
for every test that starts one: with the cache only the first compile of a program is paid.
Measured on three slow files (train_resume, train_parallel, grpo_train) on a shared machine:
CPU time 314 s -> 210 s, wall 383 s -> 205 s.

Compiles are most of the suite's time (backend compiles were 167 s of test_parity and
test_train_step's 204 s on an AVX2 host: a tiny model's training step is about 1000 fusions), so
the suite asks XLA's CPU backend for LLVM's -O0 (`--xla_backend_optimization_level=0`, in
XLA_FLAGS unless the caller chose a level; subprocesses inherit it, tests that set a device count
go through xla_env.xla_flags). It changes code generation, not the HLO: the programs, their
fusions and their custom calls are the ones users run. Measured there: a tiny V3 training step
compiles in 6.2 s instead of 9.9 s; test_parity + test_train_step 204 s -> 177 s; train_demo,
a GRPO run and the dispatch comparison 188 s -> 141 s (the tiny programs run no slower).
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import tempfile

import pytest

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="dsj-xla-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")


if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = " ".join(
      os.environ.get("XLA_FLAGS", "").split() + ["--xla_backend_optimization_level=0"])


def pytest_collection_finish(session):
  if importlib.util.find_spec("torch") is not None:
    return
  need = [i.nodeid for i in session.items if i.get_closest_marker("torch")]
  if need:
    raise pytest.UsageError(
        f"torch is not installed but {len(need)} selected tests need it (e.g. {need[0]}): "
        "install the oracle extras, or deselect them with -m 'not torch'")
