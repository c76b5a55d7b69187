"""Sharded streaming load on 4 CPU devices: each device's piece is read alone (experts of its
shard only, row ranges of its rows) and the arrays equal a one-device load."""

import os
import subprocess
import sys

from hf_reference import save_hf
from xla_env import xla_flags
from deepseek_jax import get_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = """
import collections, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from deepseek_jax.convert import safetensors_read as safetensors_io
from deepseek_jax.convert.load import default_targets, load_hf
assert jax.device_count() == 4
reads = collections.defaultdict(list)
real = safetensors_io.SafetensorsFile.read
def logged(self, name, index=None):
  out = real(self, name, index)
  reads[name].append(out.shape)
  return out
safetensors_io.SafetensorsFile.read = logged
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
def sharding(path):
  if ".experts." in path:
    return NamedSharding(mesh, P("x", None, None))    # experts split over devices
  if path.endswith("q_b_proj.kernel"):
    return NamedSharding(mesh, P(None, "x"))          # output columns split
  return NamedSharding(mesh, P())
def targets(cfg):
  return {p: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=sharding(p))
          for p, t in default_targets(cfg, jnp.float32).items()}
_, sharded = load_hf(sys.argv[1], targets=targets)
e = "model.layers.1.mlp.experts.5.down_proj.weight"
assert len(reads[e]) == 1, reads[e]                  # one device reads expert 5, once
q = "model.layers.0.self_attn.q_b_proj.weight"
assert len(reads[q]) == 4 and all(s[0] * 4 == 96 for s in reads[q]), reads[q]  # row quarters
x = sharded["layers.1.mlp.experts.down_proj"]
assert len(x.addressable_shards) == 4 and x.addressable_shards[1].data.shape == (4, 32, 64)
safetensors_io.SafetensorsFile.read = real
_, single = load_hf(sys.argv[1], dtype=jnp.float32)
for k in single:
  np.testing.assert_array_equal(np.asarray(sharded[k]), np.asarray(single[k]), err_msg=k)
print("ok")
"""


def test_each_device_reads_only_its_piece(tmp_path):
  save_hf(get_preset("tiny_v3", num_nextn_predict_layers=0), tmp_path, max_shard_size="60KB")
  r = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path)], cwd=ROOT, capture_output=True,
                     text=True, timeout=300,
                     env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
                          "XLA_FLAGS": xla_flags(4)})
  assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
