"""Data parallelism over 2 host CPU devices (in a subprocess): same losses as one device."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from deepseek_jax import metrics, trainer
from deepseek_jax.trainer import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = dict(preset="tiny_v3", data=os.path.dirname(json.__file__), seq_len=32, batch_size=4,
              steps=4, log_every=1, warmup_steps=0, learning_rate=1e-2, moe_dispatch="dense",
              peak_flops=1e11, progress=False, tensorboard=False)

SCRIPT = """
import json, sys
import jax
from deepseek_jax.trainer import TrainConfig, train
assert jax.device_count() == 2, jax.devices()
kw = json.loads(sys.argv[1])
try:
  train(TrainConfig(**kw))
except ValueError as e:
  print("ValueError:", e)
"""


def _run_two_devices(**kw):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  out = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(kw)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def test_two_device_data_parallel_matches_one_device(tmp_path):
  trainer.train(TrainConfig(workdir=str(tmp_path / "one"), **COMMON))
  stdout = _run_two_devices(workdir=str(tmp_path / "two"), **COMMON)
  assert "ValueError" not in stdout
  one = metrics.read_jsonl(str(tmp_path / "one" / "metrics.jsonl"))
  two = metrics.read_jsonl(str(tmp_path / "two" / "metrics.jsonl"))
  assert [r["step"] for r in two] == [1, 2, 3, 4]
  np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-5)
  # a batch that does not split over the 2 devices is refused with the reason
  stdout = _run_two_devices(workdir=str(tmp_path / "bad"), **{**COMMON, "batch_size": 3})
  assert "--batch_size=3 (micro-batch 3 with --grad_accum=1) is not divisible by the " \
         "data-parallel size 2" in stdout
