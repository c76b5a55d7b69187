"""Two processes x 4 CPU devices through jax.distributed equal one process with 8 devices."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from sharding_worker import ROOT, run
from xla_env import xla_flags

WORKER = os.path.join(ROOT, "tests", "sharding_worker.py")
TIMEOUT_S = 600


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes() -> list[dict]:
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(4))
  procs = [subprocess.Popen([sys.executable, WORKER, "step", str(i), "2", str(port)], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    deadline = time.monotonic() + TIMEOUT_S
    outs = [p.communicate(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
  except subprocess.TimeoutExpired:
    pytest.fail(f"two-process step did not finish within {TIMEOUT_S} s")
  finally:
    for p in procs:  # always end them, whatever happened
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-4000:]
  return [json.loads(line) for out, _ in outs for line in out.splitlines() if line.startswith("{")]


def test_two_processes_equal_one_process_with_eight_devices():
  one = run("step", "0", "1", "0", devices=8, timeout=TIMEOUT_S)
  two = _two_processes()
  assert sorted(r["process"] for r in two) == [0, 1]
  for r in two:
    assert abs(r["loss"] - one[0]["loss"]) < 1e-5, (r, one)
    assert abs(r["grad_norm"] - one[0]["grad_norm"]) < 1e-5 * one[0]["grad_norm"], (r, one)
