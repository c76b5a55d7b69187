"""NaN or Inf in weights or FP8 scales is refused by name while streaming (it used to convert
silently and give NaN logits), in both converters and in `from_pretrained`; `allow_nonfinite`
lets it through."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import get_preset
from deepseek_jax.convert import fp8
from deepseek_jax.convert.safetensors_read import INDEX_NAME, SafetensorsDir
from deepseek_jax.convert.safetensors_write import save_file
from deepseek_jax.convert.to_hf import export
from deepseek_jax.convert.to_orbax import convert
from deepseek_jax.pretrained import from_pretrained
from hf_reference import save_fp8_release, save_hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHT = "model.layers.1.mlp.experts.2.down_proj.weight"


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
  """(plain dir, FP8 dir) of one tiny V3 (released layouts)."""
  root = tmp_path_factory.mktemp("nonfinite")
  save_hf(get_preset("tiny_v3", num_nextn_predict_layers=0), root / "plain",
          max_shard_size="100KB")
  save_fp8_release(root / "plain", root / "fp8")
  return root / "plain", root / "fp8"


def _poison(src, dst, name, value):
  """A copy of the release `src` at `dst` with one element of tensor `name` (a weight's [1, 2],
  a scale's [0, 0]) set to `value`; returns the shard file."""
  shutil.copytree(src, dst)
  shard = dst / json.loads((dst / INDEX_NAME).read_text())["weight_map"][name]
  with SafetensorsDir(shard) as f:
    tensors = {k: f.read(k).copy() for k in f.keys()}
  t = tensors[name]
  at = (0, 0) if name.endswith(fp8.SCALE_SUFFIX) else (1, 2)
  if t.dtype == fp8.FP8:
    t.view(np.uint8)[at] = 0x7F  # float8_e4m3fn's NaN
  else:
    t[at] = value
  save_file(shard, tensors)
  return shard


@pytest.mark.parametrize("kind,name,value", [
    ("plain", WEIGHT, np.nan),
    ("plain", "model.embed_tokens.weight", -np.inf),
    ("fp8", WEIGHT, np.nan),
    ("fp8", fp8.scale_name(WEIGHT), np.inf),
], ids=["nan weight", "-inf embedding", "nan fp8 weight", "inf fp8 scale"])
def test_nonfinite_release_is_refused_by_name(releases, tmp_path, kind, name, value):
  src = _poison(releases[kind == "fp8"], tmp_path / "hf", name, value)
  with pytest.raises(ValueError, match="--allow_nonfinite") as e:
    convert(tmp_path / "hf", tmp_path / "out", dtype=jnp.float32)
  assert f"{src}: tensor {name!r} holds non-finite values (1 NaN or Inf" in str(e.value), e.value
  assert sorted(os.listdir(tmp_path)) == ["hf"]  # nothing written, no temporary
  with pytest.raises(ValueError, match=name):
    from_pretrained(tmp_path / "hf", dtype=jnp.float32)
  out = convert(tmp_path / "hf", tmp_path / "out", dtype=jnp.float32, allow_nonfinite=True)
  model = from_pretrained(out, dtype=jnp.float32)
  param = (model.embed_tokens.embedding if "embed" in name
           else model.layers[1].mlp.experts.down_proj)
  assert not np.isfinite(np.asarray(param[...])).all()


def test_export_refuses_a_nonfinite_parameter(releases, tmp_path):
  _poison(releases[0], tmp_path / "hf", WEIGHT, np.nan)
  ours = convert(tmp_path / "hf", tmp_path / "orbax", dtype=jnp.float32, allow_nonfinite=True)
  with pytest.raises(ValueError, match="'layers.1.mlp.experts.down_proj' holds non-finite"):
    export(ours, tmp_path / "back")
  assert not os.path.exists(tmp_path / "back")
  export(ours, tmp_path / "back", allow_nonfinite=True)
  with SafetensorsDir(tmp_path / "back") as f:
    assert np.isnan(f.read(WEIGHT)[1, 2])


def test_cli_names_the_tensor_in_one_line(releases, tmp_path):
  _poison(releases[1], tmp_path / "hf", fp8.scale_name(WEIGHT), np.inf)
  r = subprocess.run([sys.executable, "-m", "deepseek_jax.convert.hf_to_orbax",
                      f"--hf_dir={tmp_path / 'hf'}", f"--output_dir={tmp_path / 'o'}"], cwd=ROOT,
                     capture_output=True, text=True, timeout=120,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
  lines = [l for l in r.stderr.splitlines() if "error:" in l]
  assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
  assert fp8.scale_name(WEIGHT) in lines[0] and "--allow_nonfinite" in lines[0]
  assert not os.path.exists(tmp_path / "o")
