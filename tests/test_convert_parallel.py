"""The threaded conversion (loaders reading and casting ahead within a byte budget while Orbax
writes) gives exactly what the sequential one gives, raises the same errors naming the same file
or tensor, and leaves nothing behind when a worker fails."""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import checkpoint, get_preset
from deepseek_jax.convert import load, to_orbax
from deepseek_jax.convert.safetensors_read import INDEX_NAME, SafetensorsDir
from deepseek_jax.convert.safetensors_write import save_file
from hf_reference import save_fp8_release, save_hf

WEIGHT = "model.layers.1.mlp.experts.2.down_proj.weight"


@pytest.fixture(scope="module")
def fp8_release(tmp_path_factory):
  """A tiny V3 in the released FP8 layout (block-scaled weights), in many small shards."""
  root = tmp_path_factory.mktemp("parallel")
  save_hf(get_preset("tiny_v3", num_nextn_predict_layers=0), root / "plain",
          max_shard_size="100KB")
  save_fp8_release(root / "plain", root / "fp8")
  assert len([f for f in os.listdir(root / "fp8") if f.endswith(".safetensors")]) > 4
  return root / "fp8"


@pytest.fixture
def small_groups(monkeypatch):
  """Groups (and the lookahead budget) of one largest tensor, so a tiny model spans many
  partial saves and the loaders run into the budget."""
  monkeypatch.setattr(to_orbax, "MIN_GROUP_BYTES", 1)


def _stored(path):
  paths = checkpoint.param_metadata(path)
  return checkpoint.read_params_numpy(path, paths)


@pytest.mark.parametrize("keep_fp8", [False, True], ids=["dequantized", "fp8 kept"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_threaded_equals_sequential_bit_for_bit(fp8_release, tmp_path, small_groups, keep_fp8,
                                                dtype):
  one = to_orbax.convert(fp8_release, tmp_path / "one", dtype=dtype, keep_fp8=keep_fp8, workers=1)
  many = to_orbax.convert(fp8_release, tmp_path / "many", dtype=dtype, keep_fp8=keep_fp8,
                          workers=3)
  a, b = _stored(one), _stored(many)
  assert sorted(a) == sorted(b) and len(a) > 20
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    assert a[k].tobytes() == b[k].tobytes(), k


def test_lookahead_stays_within_its_byte_budget(fp8_release, monkeypatch):
  """Parameters loaded (or loading) but not yet taken by the consumer never exceed the budget
  (one larger parameter may go alone)."""
  started, taken = [], []
  with load.HFCheckpoint(fp8_release) as ckpt:
    targets = load.default_targets(ckpt.cfg, jnp.bfloat16)
    size = {p: load._target_bytes(t) for p, t in targets.items()}
    budget = 2 * max(size.values())
    real = ckpt.load

    def counting(entry, *a, **k):
      started.append(entry.ours)
      return real(entry, *a, **k)
    monkeypatch.setattr(ckpt, "load", counting)
    for path, _ in load.iter_hf(ckpt, targets, workers=3, lookahead_bytes=budget):
      ahead = [p for p in started if p not in taken and p != path]
      assert len(ahead) <= 1 or sum(size[p] for p in ahead) <= budget, (path, ahead)
      taken.append(path)
  assert taken == [e.ours for e in ckpt.entries]


def _shard(d, name):
  return d / json.loads((d / INDEX_NAME).read_text())["weight_map"][name]


def _truncate(d, name, monkeypatch):
  """Cuts the end off `name`'s shard once the checkpoint is open and validated (a copy still in
  progress): the short read happens in a worker thread."""
  shard = _shard(d, name)
  validate = load.HFCheckpoint._validate

  def then_truncate(self):
    validate(self)
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2])
  monkeypatch.setattr(load.HFCheckpoint, "_validate", then_truncate)
  return shard


def _nan(d, name, monkeypatch):
  del monkeypatch
  shard = _shard(d, name)
  with SafetensorsDir(shard) as f:
    tensors = {k: f.read(k).copy() for k in f.keys()}
  tensors[name].view(np.uint8)[1, 2] = 0x7F  # float8_e4m3fn's NaN
  save_file(shard, tensors)
  return shard


@pytest.mark.parametrize("damage,expect", [
    (_truncate, "unexpected end of file"),
    (_nan, f"tensor {WEIGHT!r} holds non-finite values")], ids=["truncated shard", "nan weight"])
def test_a_failing_worker_raises_the_sequential_error_and_leaves_nothing(
    fp8_release, tmp_path, small_groups, monkeypatch, damage, expect):
  errors = []
  for workers in (1, 3):
    d = tmp_path / "hf"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(fp8_release, d)
    with monkeypatch.context() as m:
      shard = damage(d, WEIGHT, m)
      with pytest.raises(ValueError) as e:
        to_orbax.convert(d, tmp_path / f"out{workers}", workers=workers)
    errors.append(str(e.value))
  assert errors[0] == errors[1]
  assert str(shard) in errors[1] and expect in errors[1], errors[1]
  assert sorted(os.listdir(tmp_path)) == ["hf"]  # no output, no temporary


@pytest.mark.parametrize("shape", [(16384, 512), (3, 700, 1300), (5, 300), (2, 257, 4099)])
def test_tiled_transpose_equals_numpy(shape):
  a = np.random.default_rng(0).standard_normal(shape).astype(jnp.bfloat16)
  b = load.swap_last_two(a)
  assert b.flags.c_contiguous
  np.testing.assert_array_equal(b.view(np.uint16), np.swapaxes(a, -1, -2).view(np.uint16))
