"""The memory plan against a hand computation for DeepSeek-V3 on fsdp 64 x expert 4."""

from __future__ import annotations

import subprocess
import sys

import pytest

from deepseek_jax import sharding
from deepseek_jax import get_preset

V3 = get_preset("deepseek_v3")


def hand_param_elements_v3_fsdp64_expert4() -> int:
  """Every matrix has a dimension over fsdp (64); routed experts also over expert (4); vectors
  are replicated."""
  d, v, i, ie, e, h = 7168, 129280, 18432, 2048, 256, 128
  rq, rkv, dn, dr, dv = 1536, 512, 128, 64, 128
  attn = (d * rq + rq * h * (dn + dr) + d * (rkv + dr) + rkv * h * (dn + dv) + h * dv * d) // 64
  norms = 2 * d + rq + rkv
  dense = 3 * d * i // 64
  moe = d * e // 64 + e + 3 * e * d * ie // (64 * 4) + 3 * d * ie // 64
  layers = 3 * (attn + norms + dense) + 58 * (attn + norms + moe)
  mtp = 3 * d + 2 * d * d // 64 + attn + norms + moe
  return 2 * v * d // 64 + d + layers + mtp


def test_v3_training_plan_matches_hand_computation():
  p = sharding.memory_plan(V3, {"fsdp": 64, "expert": 4}, batch=256, seq_len=4096, training=True)
  n = hand_param_elements_v3_fsdp64_expert4()
  assert p.param_elements == n
  assert p.params == 2 * n and p.gradients == 2 * n
  assert p.optimizer == 12 * n  # two float32 moments and a float32 master copy
  # activations by hand: 1 sequence of 4096 tokens per device (batch over fsdp x expert), tensor 1
  t, a = 4096, 2
  layer = (t * 7168 * 4 * a + t * 128 * (2 * 192 + 2 * 128) * a + 128 * 4096 ** 2 * 4
           + max(t * 8 * (7168 + 3 * 2048) * a, t * 3 * 18432 * a))
  acts = 61 * t * 7168 * a + 2 * layer + 2 * t * 129280 * 4
  assert p.activations == acts
  assert p.total == 16 * n + acts
  assert 5.7e9 < p.params < 5.8e9  # 671B + 14B MTP over 256 chips, mostly experts
  assert p.fits("v5p") and not p.fits("v5e")
  assert p.fits(p.total) and not p.fits(p.total - 1)


def test_totals_agree_with_the_config_count():
  for preset in ("deepseek_v3", "deepseek_v2", "deepseek_v2_lite"):
    cfg = get_preset(preset)
    assert sharding.memory_plan(cfg, {}, 1, 16).param_elements == cfg.num_params(include_mtp=True)


def test_inference_plan_and_errors():
  p = sharding.memory_plan(V3, {"fsdp": 16, "expert": 4}, batch=64, seq_len=4096, training=False)
  assert p.gradients == 0 and p.optimizer == 0
  assert p.params == 2 * sharding.memory_plan(V3, {"fsdp": 16, "expert": 4}, 64, 4096).param_elements
  with pytest.raises(ValueError, match="batch=3 is not divisible by data x fsdp x expert = 64"):
    sharding.memory_plan(V3, {"fsdp": 64}, batch=3, seq_len=16)
  # the batch rule decides how the batch splits: 16 sequences over fsdp only is also one per device
  one = sharding.memory_plan(V3, {"fsdp": 16, "expert": 4}, 16, 4096, training=False,
                      rules=sharding.parse_rules("batch=data+fsdp"))
  assert one.activations == p.activations and one.params == p.params
  with pytest.raises(ValueError, match="batch=16 is not divisible by data x fsdp x expert = 64"):
    sharding.memory_plan(V3, {"fsdp": 16, "expert": 4}, 16, 4096)
  with pytest.raises(ValueError, match="v5experiment.*unknown"):
    p.fits("v5experiment")
  with pytest.raises(ValueError, match="parameter .*experts dimension of size 256 is not "
                     "divisible by mesh axis expert of size 3"):
    sharding.memory_plan(V3, {"expert": 3}, batch=1, seq_len=16)


def test_cli_prints_the_plan():
  def cli(*args):
    out = subprocess.run([sys.executable, "-m", "deepseek_jax.sharding.plan", "--preset=deepseek_v3", *args],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout
  # training on a v5p-512 (256 chips); the -1 axis takes the rest of the slice
  out = cli("--mesh=data=1,fsdp=-1,expert=4", "--batch=256", "--seq_len=4096", "--train",
            "--device=v5p-512")
  assert "fsdp 64 x expert 4 (256 devices)" in out
  assert "fits v5p-512 (95 GiB, 256 devices): yes" in out
  # inference on a v6e-64 in bfloat16 and in FP8, against an explicit memory size
  out = cli("--mesh=fsdp=-1,expert=4", "--batch=64", "--seq_len=4096", "--device=v6e-64")
  assert "fsdp 16 x expert 4 (64 devices)" in out and "fits v6e-64 (32 GiB, 64 devices)" in out
  out = cli("--mesh=fsdp=16,expert=4", "--batch=64", "--seq_len=4096", "--param_bytes=1",
            "--device_memory=32GiB")
  assert "fits 32GiB (32 GiB, 64 devices): yes" in out


def test_device_names_and_sizes():
  assert sharding.slice_devices("v5p-256") == 128  # TPU v5p names count two cores per chip
  assert sharding.slice_devices("v6e-64") == 64 and sharding.slice_devices("h100-8") == 8
  assert sharding.slice_devices("v5e") is None
  assert sharding.device_memory("v5p-256") == 95 * 2 ** 30
  assert sharding.device_memory("80GB") == 80 * 10 ** 9
  assert sharding.device_memory("1.5 GiB") == 3 * 2 ** 29
  with pytest.raises(ValueError, match="unknown unit 'tb'"):
    sharding.device_memory("2TB")
  with pytest.raises(ValueError, match="expected NAME-COUNT"):
    sharding.slice_devices("v5p-many")
