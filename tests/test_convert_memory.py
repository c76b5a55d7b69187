"""Bounded host memory: converting a ~1 GB multi-shard checkpoint, and one twice as large with the
same largest tensor, keeps peak RSS below baseline + a bound set by the largest single tensor."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np

from deepseek_jax.convert import names
from deepseek_jax.convert.safetensors_write import TensorSpec, write_sharded
from deepseek_jax.convert.to_orbax import MIN_GROUP_BYTES
from deepseek_jax import get_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a fresh process: a tiny conversion first (imports, Orbax and XLA set up: the baseline),
# then the measured one. ru_maxrss is the process's peak resident set.
_CHILD = """
import json, resource, sys
import jax.numpy as jnp
from deepseek_jax.convert.to_orbax import convert
small, big, out = sys.argv[1:4]
convert(small, out + ".warm", dtype=jnp.bfloat16)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
convert(big, out, dtype=jnp.bfloat16)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"base": base, "peak": peak}))
"""


def _cfg(layers):
  """Layers of ~100 MB (float32): stacked experts [32, 512, 512] are the largest tensors."""
  return get_preset("tiny_v2_lite", vocab_size=16384, hidden_size=512, intermediate_size=1024,
                    moe_intermediate_size=512, n_routed_experts=32, n_shared_experts=1,
                    num_experts_per_tok=2, num_hidden_layers=layers, first_k_dense_replace=1,
                    kv_lora_rank=64, num_attention_heads=4, num_nextn_predict_layers=0)


def _generate(directory, layers, cfg=None):
  """A random float32 release written tensor by tensor (never whole in memory)."""
  cfg = cfg or _cfg(layers)
  entries = names.entries(cfg)
  specs = [TensorSpec(n, np.dtype(np.float32), e.hf_shape()) for e in entries for n in e.hf]
  rng = np.random.default_rng(0)
  write_sharded(directory, specs, lambda s: rng.random(s.shape, dtype=np.float32),
                max_shard_size="200MB", extra_files={"config.json": json.dumps(cfg.to_hf())})
  return sum(s.nbytes for s in specs), max(math.prod(e.shape) * 4 for e in entries)


def _measure(tmp_path, small, name, layers):
  """Writes a release of `layers` layers, converts it in a child process and deletes both at once
  (pass or fail: two gigabyte checkpoints never lie on the disk together)."""
  big = tmp_path / name
  try:
    size, largest = _generate(big, layers)
    shards = len(os.listdir(big))
    return size, largest, shards, _peak(tmp_path, small, big, name + ".out")
  finally:
    for path in (big, tmp_path / (name + ".out"), tmp_path / (name + ".out.warm")):
      shutil.rmtree(path, ignore_errors=True)


def _peak(tmp_path, small, big, name):
  out = subprocess.run([sys.executable, "-c", _CHILD, str(small), str(big), str(tmp_path / name)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
                            # glibc gives each writer thread its own heap arena, whose freed
                            # pages linger in RSS; two arenas measure our buffers, not that
                            "MALLOC_ARENA_MAX": "2"})
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_peak_rss_is_bounded_by_the_largest_tensor_not_the_model(tmp_path):
  _generate(tmp_path / "small", 0, get_preset("tiny_v2_lite", num_nextn_predict_layers=0))
  size1, largest1, _, r1 = _measure(tmp_path, tmp_path / "small", "one", 10)
  size2, largest2, shards2, r2 = _measure(tmp_path, tmp_path / "small", "two", 20)
  assert 0.9e9 < size1 < 1.2e9 and 1.9 < size2 / size1 < 2.1
  assert largest1 == largest2 == 32 * 512 * 512 * 4
  assert shards2 > 8  # several shards
  # The bound: the staged released-layout copy and the converted copy of one tensor, Orbax's write
  # buffers, and three save groups of at most G = max(largest, MIN_GROUP_BYTES) (one being
  # written, one being gathered, and up to G read and cast ahead by the loader threads, issue
  # 17); plus allocator slack. Nothing in it grows with the model.
  bound = 4 * largest1 + 3 * max(largest1, MIN_GROUP_BYTES) + 64 * 2**20
  for r, size in ((r1, size1), (r2, size2)):
    grown = r["peak"] - r["base"]
    print(f"{size / 1e9:.2f} GB: peak RSS grew {grown / 2**20:.0f} MiB (bound {bound / 2**20:.0f} MiB)")
    assert grown < bound, f"{size / 1e9:.1f} GB checkpoint: peak RSS grew {grown / 2**20:.0f} MiB"
    assert grown < size / 3  # far below the checkpoint itself
  assert abs((r2["peak"] - r2["base"]) - (r1["peak"] - r1["base"])) < 64 * 2**20  # size-independent
