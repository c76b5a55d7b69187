"""FP8 block quantization: a tiny V3 in the released FP8 layout (dims not multiples of 128) loads
to exactly weight × block scale, our logits match transformers on the dequantized weights, and FP8
kept through Orbax writes back bit-identical."""

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import transformers

from deepseek_jax.convert import fp8, names
from deepseek_jax.convert.load import load_hf
from deepseek_jax.convert.safetensors_read import SafetensorsDir
from deepseek_jax.convert.safetensors_write import TensorSpec, write_sharded
from deepseek_jax.convert.to_hf import export
from deepseek_jax.convert.to_orbax import convert
from deepseek_jax import get_preset
from deepseek_jax.params import model_from_flat
from hf_reference import hf_logits, save_hf

# hidden 160, expert 136, dense 200, q rank 144: partial 128-blocks on both axes.
CFG = get_preset("tiny_v3", hidden_size=160, intermediate_size=200, moe_intermediate_size=136,
                 q_lora_rank=144, num_nextn_predict_layers=0)
IDS = np.array([[5, 80, 311, 2, 9, 47, 400, 1]], np.int32)


def _numpy_dequant(w8, scale, block):
  """weight × the scale of its block, written independently of convert.fp8."""
  s = np.repeat(np.repeat(scale, block[0], axis=0), block[1], axis=1)[:w8.shape[0], :w8.shape[1]]
  return w8.astype(np.float32) * s


def _write(directory, tensors, raw_cfg, shard="150KB"):
  specs = [TensorSpec(k, v.dtype, v.shape) for k, v in tensors.items()]
  write_sharded(directory, specs, lambda s: tensors[s.name], max_shard_size=shard,
                extra_files={"config.json": json.dumps(raw_cfg)})


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  """(fp8 dir, dequantized f32 dir, fp8 tensors, block) of a quantized tiny V3."""
  root = tmp_path_factory.mktemp("fp8")
  save_hf(CFG, root / "f32")
  raw = json.loads((root / "f32" / "config.json").read_text())
  block = (128, 128)
  q, deq = {}, {}
  with SafetensorsDir(root / "f32") as src:
    for k in src.keys():
      w = src.read(k)
      if fp8.is_quantized_name(k):
        w8, s = fp8.quantize(w, block)
        q[k], q[fp8.scale_name(k)] = w8, s
        deq[k] = _numpy_dequant(w8, s, block)
      else:
        q[k] = deq[k] = w
  _write(root / "fp8", q, {**raw, "quantization_config": fp8.quantization_config(block)})
  _write(root / "deq", deq, raw)
  return root, q, block


def test_quantize_blocks_and_partial_edges():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((300, 130)).astype(np.float32)
  w[:128, :128] *= 50  # blocks of very different ranges
  w8, s = fp8.quantize(w)
  assert w8.dtype == ml_dtypes.float8_e4m3fn and s.shape == (3, 2) and s.dtype == np.float32
  for i in range(3):
    for j in range(2):
      blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
      assert s[i, j] == np.float32(np.abs(blk).max() / 448)
  d = fp8.dequantize(w8, s)
  np.testing.assert_array_equal(d, _numpy_dequant(w8, s, (128, 128)))
  assert np.abs(d - w).max() <= np.abs(w).max() / 448 * 32  # e4m3 keeps 3 mantissa bits
  rel = np.abs(d - w) / np.maximum(np.abs(w), 1e-3)
  assert np.median(rel) < 0.04
  # A slice dequantizes like the same slice of the whole.
  np.testing.assert_array_equal(fp8.dequantize(w8[100:290, 3:129], s, rows=(100, 290), cols=(3, 129)),
                                d[100:290, 3:129])
  zero8, zs = fp8.quantize(np.zeros((5, 5), np.float32))
  assert zs.tolist() == [[1.0]] and not np.any(fp8.dequantize(zero8, zs))


def test_block_size_from_config():
  assert fp8.block_size({"quantization_config": fp8.quantization_config((64, 32))}) == (64, 32)
  assert fp8.block_size({}) is None
  with pytest.raises(ValueError, match="weight_block_size"):
    fp8.block_size({"quantization_config": {"quant_method": "fp8", "weight_block_size": [0]}})
  with pytest.raises(ValueError, match="only fp8"):
    fp8.block_size({"quantization_config": {"quant_method": "awq"}})


def test_loaded_weights_equal_numpy_dequantization(release):
  root, q, block = release
  cfg, flat = load_hf(root / "fp8", dtype=jnp.float32)
  checked = 0
  for e in names.entries(cfg):
    if not fp8.is_quantized_name(e.hf[0]):
      np.testing.assert_array_equal(np.asarray(flat[e.ours]), e.to_ours([q[n] for n in e.hf]))
      continue
    want = e.to_ours([_numpy_dequant(q[n], q[fp8.scale_name(n)], block) for n in e.hf])
    np.testing.assert_array_equal(np.asarray(flat[e.ours]), want, err_msg=e.ours)
    checked += 1
  partial = [n for n in q if n.endswith("_scale_inv") and q[n].shape != (1, 1)]
  assert checked > 10 and partial  # several weights span more than one block


@pytest.mark.torch
def test_logits_match_transformers_on_dequantized_weights(release):
  root, _, _ = release
  hf = transformers.DeepseekV3ForCausalLM.from_pretrained(str(root / "deq"), dtype="float32").eval()
  cfg, flat = load_hf(root / "fp8", dtype=jnp.float32)
  model = model_from_flat(cfg.replace(moe_dispatch="dense"), flat)
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(IDS))), hf_logits(hf, IDS),
                             rtol=2e-4, atol=2e-4)


def test_kept_fp8_round_trips_bit_identical(release, tmp_path):
  root, q, _ = release
  cfg, flat = load_hf(root / "fp8", dtype=jnp.bfloat16, keep_fp8=True)
  k = "layers.1.mlp.experts.down_proj"
  e = CFG.n_routed_experts
  assert flat[k].dtype == jnp.float8_e4m3fn and flat[k].shape == (e, 136, 160)
  assert flat[k + "_scale_inv"].shape == (e, 2, 2)  # [E, in blocks, out blocks]
  assert flat["layers.0.input_layernorm.scale"].dtype == jnp.bfloat16
  convert(root / "fp8", tmp_path / "orbax", keep_fp8=True, dtype=jnp.float32)
  export(tmp_path / "orbax", tmp_path / "out", max_shard_size="200KB")
  with SafetensorsDir(tmp_path / "out") as f:
    assert sorted(f.keys()) == sorted(q)
    for name, v in q.items():
      got = f.read(name)
      assert got.dtype == v.dtype, name
      np.testing.assert_array_equal(got.view(np.uint8), v.view(np.uint8), err_msg=name)
  assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"][
      "weight_block_size"] == [128, 128]


def test_export_fp8_matches_quantize(release, tmp_path):
  root, q, _ = release
  convert(root / "f32", tmp_path / "orbax", dtype=jnp.float32)
  export(tmp_path / "orbax", tmp_path / "out", fp8=True, max_shard_size="200KB")
  with SafetensorsDir(tmp_path / "out") as f:
    assert sorted(f.keys()) == sorted(q)
    for name, v in q.items():
      np.testing.assert_array_equal(f.read(name).view(np.uint8), v.view(np.uint8), err_msg=name)
  # and it loads back to the dequantized weights
  _, flat = load_hf(tmp_path / "out", dtype=jnp.float32)
  _, ref = load_hf(root / "fp8", dtype=jnp.float32)
  for k in ref:
    np.testing.assert_array_equal(np.asarray(flat[k]), np.asarray(ref[k]), err_msg=k)


def test_other_block_sizes_follow_the_config(tmp_path):
  rng = np.random.default_rng(1)
  cfg = get_preset("tiny_v2_lite", num_nextn_predict_layers=0)
  save_hf(cfg, tmp_path / "f32")
  raw = json.loads((tmp_path / "f32" / "config.json").read_text())
  block = (48, 40)
  name = "model.layers.0.self_attn.kv_b_proj.weight"
  with SafetensorsDir(tmp_path / "f32") as src:
    t = {k: src.read(k) for k in src.keys()}
  t[name] = (t[name] + rng.standard_normal(t[name].shape).astype(np.float32))
  w8, s = fp8.quantize(t[name], block)
  t[name], t[fp8.scale_name(name)] = w8, s
  _write(tmp_path / "q", t, {**raw, "quantization_config": fp8.quantization_config(block)})
  _, flat = load_hf(tmp_path / "q", dtype=jnp.float32)
  np.testing.assert_array_equal(np.asarray(flat["layers.0.self_attn.kv_b_proj.kernel"]),
                                _numpy_dequant(w8, s, block).T)


def test_from_pretrained_dequantizes_kept_fp8_like_the_release(release, tmp_path):
  """An Orbax checkpoint that kept FP8 (weights + block scales) loads as the same float32 model
  as the FP8 release itself: W = w * scale_inv[i // 128, o // 128] in our [in, out] layout."""
  from deepseek_jax import from_pretrained
  from deepseek_jax.params import flat_state
  root, _, _ = release
  convert(root / "fp8", tmp_path / "orbax", keep_fp8=True, dtype=jnp.float32)
  kept = flat_state(from_pretrained(tmp_path / "orbax", dtype=jnp.float32))
  direct = flat_state(from_pretrained(root / "fp8", dtype=jnp.float32))
  assert set(kept) == set(direct) and not any(k.endswith("_scale_inv") for k in kept)
  for k in direct:
    assert kept[k].dtype == direct[k].dtype, k
    np.testing.assert_array_equal(np.asarray(kept[k]), np.asarray(direct[k]), err_msg=k)


def test_fp8_base_keeps_the_released_fp8_weights(release):
  """from_pretrained(weight_quant="fp8") on an FP8 release: each FP8 weight stays the release's
  bytes (transposed to our layout) with its block scales, dequantized only inside the forward,
  and the model computes what the dequantized release computes."""
  from deepseek_jax import from_pretrained
  from deepseek_jax.params import flat_state
  root, q, block = release
  base = from_pretrained(root / "fp8", dtype=jnp.float32, weight_quant="fp8",
                         moe_dispatch="dense")
  flat = flat_state(base)
  cfg, kept = load_hf(root / "fp8", dtype=jnp.float32, keep_fp8=True)
  checked = 0
  for e in names.entries(cfg):
    if fp8.is_quantized_name(e.hf[0]):
      np.testing.assert_array_equal(np.asarray(flat[e.ours]).view(np.uint8),
                                    np.asarray(kept[e.ours]).view(np.uint8), err_msg=e.ours)
      np.testing.assert_array_equal(np.asarray(flat[e.ours + "_scale"]),
                                    np.asarray(kept[e.ours + fp8.SCALE_SUFFIX]))
      checked += 1
  assert checked > 10
  # dequantized inside the forward: the same logits as the same weights dequantized up front
  from deepseek_jax.adapters import merge_adapters
  dequantized = merge_adapters(base)
  assert dequantized.cfg.weight_quant == "none"
  np.testing.assert_allclose(np.asarray(base(jnp.asarray(IDS))),
                             np.asarray(dequantized(jnp.asarray(IDS))), atol=1e-5, rtol=1e-5)
