"""Our safetensors reader/writer: bit-exact against the safetensors library, slice reads, clear
errors for malformed files and directories, pickles refused, atomic sharded output."""

import json
import os
import pickle
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file as lib_save_numpy

from deepseek_jax.convert import safetensors_read as sio
from deepseek_jax.convert import safetensors_write as siw

RNG = np.random.default_rng(0)


def _tensors():
  return {
      "f32": RNG.standard_normal((7, 5, 3)).astype(np.float32),
      "f16": RNG.standard_normal((4, 9)).astype(np.float16),
      "bf16": RNG.standard_normal((6, 4)).astype(ml_dtypes.bfloat16),
      "fp8": RNG.standard_normal((5, 130)).astype(ml_dtypes.float8_e4m3fn),
      "i32": RNG.integers(-9, 9, (3, 2)).astype(np.int32),
      "i64": np.arange(11, dtype=np.int64),
      "u8": RNG.integers(0, 255, (8,)).astype(np.uint8),
      "scalar": np.array(3.5, np.float32),
      "empty": np.zeros((0, 4), np.float32),
  }


def _bits(a):
  return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


@pytest.mark.torch
def test_written_files_read_back_bit_exact_by_us_and_the_library(tmp_path):
  t = _tensors()
  path = tmp_path / "x.safetensors"
  siw.save_file(path, t)
  with sio.SafetensorsFile(path) as f:
    assert sorted(f.keys()) == sorted(t)
    for k, v in t.items():
      got = f.read(k)
      assert got.dtype == v.dtype and got.shape == v.shape, k
      np.testing.assert_array_equal(_bits(got), _bits(v), err_msg=k)
      np.testing.assert_array_equal(_bits(f.view(k)), _bits(v), err_msg=k)
    assert f.info("fp8").dtype == "F8_E4M3"
  import torch  # the library's own reader, as an independent check (marked torch)
  from safetensors.torch import load_file as lib_load_torch
  lib = lib_load_torch(str(path))
  assert lib["fp8"].dtype == torch.float8_e4m3fn and lib["bf16"].dtype == torch.bfloat16
  for k, v in t.items():
    got = lib[k].view(torch.uint8) if lib[k].dtype in (torch.float8_e4m3fn, torch.bfloat16) else lib[k]
    np.testing.assert_array_equal(_bits(got.numpy()), _bits(v), err_msg=k)


def test_library_written_file_reads_with_slices(tmp_path):
  t = {k: v for k, v in _tensors().items() if k in ("f32", "f16", "i64")}
  path = tmp_path / "lib.safetensors"
  lib_save_numpy(t, str(path))
  a = t["f32"]
  with sio.SafetensorsFile(path) as f:
    for ix in [(slice(2, 5),), (3,), (slice(1, 6), slice(1, 4)), (2, slice(1, 3)),
               (slice(None), slice(None), slice(1, 2)), (slice(0, 7), slice(0, 5), 2),
               (-1, 0), (slice(4, 4),), (slice(1, 3), slice(None), slice(0, 3))]:
      np.testing.assert_array_equal(f.read("f32", ix), a[ix], err_msg=str(ix))
    np.testing.assert_array_equal(f.read("i64", slice(3, 8)), t["i64"][3:8])
    with pytest.raises(IndexError, match="step"):
      f.read("f32", slice(0, 6, 2))
    with pytest.raises(KeyError, match="nope"):
      f.read("nope")


def test_chunked_reads_cut_inner_slices_without_reading_everything(tmp_path, monkeypatch):
  a = RNG.standard_normal((300, 40)).astype(np.float32)
  siw.save_file(tmp_path / "a.safetensors", {"a": a})
  monkeypatch.setattr(sio, "_CHUNK", 40 * 4 * 7)  # 7 rows per chunk
  reads = []
  real = sio._pread_into
  monkeypatch.setattr(sio, "_pread_into", lambda fd, buf, off, p: (reads.append(buf.nbytes),
                                                                   real(fd, buf, off, p)))
  with sio.SafetensorsFile(tmp_path / "a.safetensors") as f:
    np.testing.assert_array_equal(f.read("a", (slice(10, 290), slice(5, 17))), a[10:290, 5:17])
    assert max(reads) <= 7 * 40 * 4 and sum(reads) == 280 * 40 * 4
    reads.clear()
    np.testing.assert_array_equal(f.read("a", (slice(100, 150),)), a[100:150])
    assert reads == [50 * 40 * 4]  # one contiguous read of exactly those rows


def _raw_file(path, header, data=b"", declared=None):
  raw = header if isinstance(header, bytes) else json.dumps(header).encode()
  n = len(raw) if declared is None else declared
  path.write_bytes(struct.pack("<Q", n) + raw + data)
  return path


@pytest.mark.parametrize("case,match", [
    ("tiny", "truncated"),
    ("header_beyond", "beyond the file size"),
    ("bad_json", "not valid JSON"),
    ("not_object", "JSON object"),
    ("bad_dtype", "unsupported dtype"),
    ("size_mismatch", "needs 24"),
    ("beyond_data", "beyond the data section"),
    ("overlap", "overlap"),
    ("bad_shape", "not a list"),
])
def test_malformed_files_name_the_file_and_tensor(tmp_path, case, match):
  p = tmp_path / f"{case}.safetensors"
  good = {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}
  if case == "tiny":
    p.write_bytes(b"\x01\x02")
  elif case == "header_beyond":
    _raw_file(p, good, bytes(24), declared=10**6)
  elif case == "bad_json":
    _raw_file(p, b'{"w": {"dtype": "F32", "sha', bytes(24))
  elif case == "not_object":
    _raw_file(p, [1, 2], bytes(24))
  elif case == "bad_dtype":
    _raw_file(p, {"w": {"dtype": "Q4", "shape": [2, 3], "data_offsets": [0, 24]}}, bytes(24))
  elif case == "size_mismatch":
    _raw_file(p, {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}, bytes(24))
  elif case == "beyond_data":  # a file cut short in its data section
    _raw_file(p, good, bytes(10))
  elif case == "overlap":
    _raw_file(p, {**good, "v": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}, bytes(24))
  elif case == "bad_shape":
    _raw_file(p, {"w": {"dtype": "F32", "shape": "2x3", "data_offsets": [0, 24]}}, bytes(24))
  with pytest.raises(sio.SafetensorsError, match=match) as e:
    sio.SafetensorsFile(p)
  assert str(p) in str(e.value)
  if case in ("bad_dtype", "size_mismatch", "beyond_data", "bad_shape"):
    assert "'w'" in str(e.value)


class _Boom:
  """Unpickling this would create a file: proof that nothing was unpickled."""
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


@pytest.mark.parametrize("fname", ["pytorch_model.bin", "model.pt", "weights.pth", "x.ckpt"])
def test_pickles_are_refused_never_unpickled(tmp_path, fname):
  marker = tmp_path / "unpickled"
  (tmp_path / fname).write_bytes(pickle.dumps(_Boom(str(marker))))
  with pytest.raises(sio.PickleCheckpointError, match="pickle"):
    sio.SafetensorsDir(tmp_path)
  with pytest.raises(sio.PickleCheckpointError, match=fname):
    sio.SafetensorsDir(tmp_path / fname)
  assert not marker.exists()


def _sharded_dir(tmp_path):
  t = {f"t{i}": RNG.standard_normal((16, 16)).astype(np.float32) for i in range(6)}
  specs = [siw.TensorSpec(k, v.dtype, v.shape) for k, v in t.items()]
  d = tmp_path / "ckpt"
  files = siw.write_sharded(d, specs, lambda s: t[s.name], max_shard_size=2 * 16 * 16 * 4)
  return d, t, files


def test_sharded_write_and_directory_read(tmp_path):
  d, t, files = _sharded_dir(tmp_path)
  assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
  index = json.loads((d / sio.INDEX_NAME).read_text())
  assert index["metadata"]["total_size"] == 6 * 1024
  assert index["weight_map"]["t5"] == files[2]
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporary left
  with sio.SafetensorsDir(d) as r:
    assert sorted(r.keys()) == sorted(t)
    for k, v in t.items():
      np.testing.assert_array_equal(r.read(k, slice(3, 9)), v[3:9])
  # One shard: the single-file name, no index.
  one = tmp_path / "one"
  siw.write_sharded(one, [siw.TensorSpec("a", np.float32, (2,))], lambda s: np.ones(2, np.float32))
  assert sorted(os.listdir(one)) == ["model.safetensors"]


def test_output_is_atomic_and_refuses_non_empty_directories(tmp_path):
  d, t, _ = _sharded_dir(tmp_path)
  before = sorted(os.listdir(d))
  specs = [siw.TensorSpec("a", np.float32, (2,))]
  with pytest.raises(FileExistsError, match="not empty"):
    siw.write_sharded(d, specs, lambda s: np.ones(2, np.float32))

  def failing(s):
    raise RuntimeError("producer failed")
  with pytest.raises(RuntimeError, match="producer failed"):
    siw.write_sharded(d, specs, failing, overwrite=True)
  assert sorted(os.listdir(d)) == before  # the old output is untouched
  with pytest.raises(sio.SafetensorsError, match="produced as"):
    siw.write_sharded(tmp_path / "new", specs, lambda s: np.ones(3, np.float32))
  assert not (tmp_path / "new").exists()
  assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporaries anywhere
  siw.write_sharded(d, specs, lambda s: np.ones(2, np.float32), overwrite=True)
  assert sorted(os.listdir(d)) == ["model.safetensors"]


@pytest.mark.parametrize("case,match", [
    ("missing_shard", "is missing"),
    ("dotdot", "outside the checkpoint directory"),
    ("absolute", "outside the checkpoint directory"),
    ("symlink", "symlink"),
    ("not_in_shard", "does not contain it"),
    ("bad_index", "not valid JSON"),
    ("no_weight_map", "weight_map"),
    ("pickle_shard", "pickle"),
])
def test_bad_directories_name_the_index_and_tensor(tmp_path, case, match):
  d, t, files = _sharded_dir(tmp_path)
  index_path = d / sio.INDEX_NAME
  index = json.loads(index_path.read_text())
  wm = index["weight_map"]
  outside = tmp_path / "outside.safetensors"
  siw.save_file(outside, {"t0": t["t0"]})
  if case == "missing_shard":
    os.remove(d / files[1])
  elif case == "dotdot":
    wm["t0"] = "../outside.safetensors"
  elif case == "absolute":
    wm["t0"] = str(outside)
  elif case == "symlink":
    os.symlink(outside, d / "link.safetensors")
    wm["t0"] = "link.safetensors"
  elif case == "not_in_shard":
    wm["t0"] = files[2]
  elif case == "bad_index":
    index_path.write_text("{not json")
  elif case == "no_weight_map":
    index_path.write_text(json.dumps({"metadata": {}}))
  elif case == "pickle_shard":
    wm["t0"] = "pytorch_model-00001.bin"
  if case not in ("bad_index", "no_weight_map"):
    index_path.write_text(json.dumps(index))
  with pytest.raises(sio.SafetensorsError, match=match) as e:
    sio.SafetensorsDir(d)
  assert str(d) in str(e.value)
  if case in ("dotdot", "absolute", "symlink", "not_in_shard"):
    assert "'t0'" in str(e.value)


def test_parse_size():
  assert siw.parse_size("5GB") == 5 * 10**9
  assert siw.parse_size("500MB") == 5 * 10**8
  assert siw.parse_size("2GiB") == 2 * 2**30
  assert siw.parse_size("1000") == 1000
  with pytest.raises(ValueError, match="5XB"):
    siw.parse_size("5XB")
