"""Bad input to the conversion: each case fails with an error naming the file or tensor, and no
output (nor any temporary) is left behind."""

import json
import os
import pickle
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from deepseek_jax.convert.safetensors_read import INDEX_NAME, SafetensorsDir
from deepseek_jax.convert.safetensors_write import save_file
from deepseek_jax.convert.to_orbax import convert
from deepseek_jax import get_preset
from hf_reference import save_hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VICTIM = "model.layers.1.mlp.experts.3.up_proj.weight"


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  d = tmp_path_factory.mktemp("release") / "hf"
  save_hf(get_preset("tiny_v2_lite", num_nextn_predict_layers=0), d, max_shard_size="60KB")
  return d


def _rewrite_shard_of(d, name, edit):
  """Rewrites the shard holding `name` with edit(dict of its tensors)."""
  shard = json.loads((d / INDEX_NAME).read_text())["weight_map"][name]
  with SafetensorsDir(d / shard) as f:
    tensors = {k: f.read(k) for k in f.keys()}
  edit(tensors)
  save_file(d / shard, tensors)
  return d / shard


def _break(d, case):
  index_path = d / INDEX_NAME
  index = json.loads(index_path.read_text())
  wm = index["weight_map"]
  shard = d / wm[VICTIM]
  if case == "missing_shard":
    os.remove(shard)
    return [shard.name]
  if case == "missing_tensor":
    _rewrite_shard_of(d, VICTIM, lambda t: t.pop(VICTIM))
    del wm[VICTIM]
    index_path.write_text(json.dumps(index))
    return [VICTIM]
  if case == "wrong_shape":
    f = _rewrite_shard_of(d, VICTIM, lambda t: t.update({VICTIM: t[VICTIM][:, :-1].copy()}))
    return [VICTIM, str(f), "shape"]
  if case == "wrong_dtype":
    f = _rewrite_shard_of(d, VICTIM, lambda t: t.update({VICTIM: t[VICTIM].astype(np.int32)}))
    return [VICTIM, str(f), "I32"]
  if case == "truncated":
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) - 100])
    return [str(shard), "truncated"]
  if case == "corrupted_header":
    data = bytearray(shard.read_bytes())
    data[8:14] = b"#$%^&*"
    shard.write_bytes(bytes(data))
    return [str(shard), "not valid JSON"]
  if case == "outside_index":
    wm[VICTIM] = "../x.safetensors"
    index_path.write_text(json.dumps(index))
    return [VICTIM, "outside the checkpoint directory"]
  if case == "no_config":
    os.remove(d / "config.json")
    return ["config.json"]
  if case == "bad_config":
    (d / "config.json").write_text('{"model_type": "deepseek_v3",')
    return ["config.json", "not valid JSON"]
  if case == "invalid_config":
    raw = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**raw, "n_group": 3}))
    return ["n_group"]
  if case == "pickle":
    for f in os.listdir(d):
      if f.endswith((".safetensors", ".json")) and f != "config.json":
        os.remove(d / f)
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"a": 1}))
    return ["pytorch_model.bin", "pickle"]
  raise AssertionError(case)


CASES = ["missing_shard", "missing_tensor", "wrong_shape", "wrong_dtype", "truncated",
         "corrupted_header", "outside_index", "no_config", "bad_config", "invalid_config", "pickle"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_named_and_leaves_nothing(release, tmp_path, case):
  d = tmp_path / "hf"
  shutil.copytree(release, d)
  (tmp_path / "x.safetensors").write_bytes((d / os.listdir(d)[0]).read_bytes())
  expected = _break(d, case)
  out = tmp_path / "out"
  with pytest.raises((ValueError, KeyError, FileNotFoundError)) as e:
    convert(d, out)
  for part in expected:
    assert part in str(e.value), (case, str(e.value))
  assert sorted(os.listdir(tmp_path)) == ["hf", "x.safetensors"]  # no output, no temporary


def test_cli_reports_the_error(release, tmp_path):
  d = tmp_path / "hf"
  shutil.copytree(release, d)
  expected = _break(d, "wrong_shape")
  r = subprocess.run([sys.executable, "-m", "deepseek_jax.convert.hf_to_orbax", f"--hf_dir={d}",
                      f"--output_dir={tmp_path / 'out'}"], cwd=ROOT, capture_output=True,
                     text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode != 0 and all(p in r.stderr for p in expected), r.stderr[-2000:]
  assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_cli_converts_and_refuses_to_overwrite(release, tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  args = [sys.executable, "-m", "deepseek_jax.convert.hf_to_orbax", f"--hf_dir={release}",
          f"--output_dir={tmp_path / 'o'}", "--dtype=float32"]
  r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "hf_to_orbax: 100%" in r.stderr and "B/s" in r.stderr  # the progress bar (tqdm)
  # and nothing else: Orbax's ~40 INFO lines and its deprecation warning used to follow
  assert not re.search(r"^[IWE]\d{4} |deprecated", r.stderr.replace("\r", "\n"), re.M), r.stderr
  r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
  assert r.returncode != 0 and "not empty" in r.stderr
  r = subprocess.run([sys.executable, "-m", "deepseek_jax.convert.orbax_to_hf", f"--checkpoint_dir={tmp_path / 'o'}",
                      f"--output_dir={tmp_path / 'h'}", "--max_shard_size=50KB"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
  assert r.returncode == 0, r.stderr[-2000:]
  with SafetensorsDir(release) as a, SafetensorsDir(tmp_path / "h") as b:
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
      np.testing.assert_array_equal(a.read(k), b.read(k), err_msg=k)
