"""Data parallelism over 2 host CPU devices (in a subprocess): same losses as one device."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys

import numpy as np

from deepseek_jax import get_preset, metrics, trainer
from deepseek_jax.params import abstract_model, flat_state
from deepseek_jax.train_config import TrainConfig
from xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = dict(preset="tiny_v3", data=os.path.dirname(json.__file__), seq_len=32, batch_size=4,
              steps=4, log_every=1, warmup_steps=0, learning_rate=1e-2, moe_dispatch="dense",
              peak_flops=1e11, progress=False, tensorboard=False)

SCRIPT = """
import json, sys
import jax
from deepseek_jax.train_config import TrainConfig
from deepseek_jax.trainer import train
assert jax.device_count() == 2, jax.devices()
kw = json.loads(sys.argv[1])
try:
  train(TrainConfig(**kw), echo=print)
except ValueError as e:
  print("ValueError:", e)
"""


def _run_two_devices(**kw):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(2))
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


def test_two_device_expert_sharding_matches_one_device_and_splits_the_state(tmp_path):
  kw = dict(COMMON, moe_dispatch="blocked", steps=3)
  trainer.train(TrainConfig(workdir=str(tmp_path / "one"), **kw))
  stdout = _run_two_devices(workdir=str(tmp_path / "two"), expert=2, **kw)
  assert "ValueError" not in stdout
  one = metrics.read_jsonl(str(tmp_path / "one" / "metrics.jsonl"))
  two = metrics.read_jsonl(str(tmp_path / "two" / "metrics.jsonl"))
  np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-5)
  # the routed experts are split over the two devices, not replicated: each device is spared at
  # least half of their float32 weights (their optimizer moments too, not counted here)
  total, per_device = map(float, re.search(r"train state ([\d.]+) MiB, at most ([\d.]+) MiB",
                                           stdout).groups())
  flat = flat_state(abstract_model(get_preset("tiny_v3")))
  expert_mib = sum(v.size for p, v in flat.items() if ".experts." in p) * 4 / 2**20
  assert expert_mib > 0.1 * total
  assert per_device <= total - expert_mib / 2 + 0.01, stdout
