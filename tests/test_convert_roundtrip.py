"""HF -> Orbax -> HF: bit-identical tensors in the same dtypes; transformers loads the export and
gives the original logits; our model restored from Orbax agrees; MTP tensors and their copies."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from deepseek_jax.convert import names
from deepseek_jax.convert.load import load_hf
from deepseek_jax.convert.load import default_targets
from deepseek_jax.convert.safetensors_read import INDEX_NAME, SafetensorsDir
from deepseek_jax.convert.safetensors_write import TensorSpec, write_sharded
from deepseek_jax.convert.to_hf import export
from deepseek_jax.convert.to_orbax import convert
from deepseek_jax.export_hf import export_any
from deepseek_jax import checkpoint, from_pretrained, get_preset, workdir
from deepseek_jax.model import DeepseekForCausalLM
from deepseek_jax.params import flat_state
from hf_reference import hf_logits, save_hf

IDS = np.array([[3, 17, 99, 4, 250, 7, 31, 2]], np.int32)


def _same_tensors(a_dir, b_dir):
  with SafetensorsDir(a_dir) as a, SafetensorsDir(b_dir) as b:
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
      x, y = a.read(k), b.read(k)
      assert x.dtype == y.dtype and x.shape == y.shape, k
      np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8), err_msg=k)


def _shards(d):
  return json.loads((d / INDEX_NAME).read_text())["weight_map"].values()


@pytest.mark.torch
@pytest.mark.parametrize("name", ["tiny_v3", "tiny_v2", "tiny_v2_lite"])
def test_round_trip_is_bit_identical_and_transformers_agrees(tmp_path, name):
  cfg = get_preset(name, num_nextn_predict_layers=0)
  hf = save_hf(cfg, tmp_path / "hf", max_shard_size="60KB")
  assert len(set(_shards(tmp_path / "hf"))) > 2
  convert(tmp_path / "hf", tmp_path / "orbax", dtype=jnp.float32)
  assert checkpoint.is_model_checkpoint(tmp_path / "orbax")
  assert not checkpoint.is_model_checkpoint(tmp_path / "hf")
  export(tmp_path / "orbax", tmp_path / "out", max_shard_size="80KB")
  assert len(set(_shards(tmp_path / "out"))) > 2
  _same_tensors(tmp_path / "hf", tmp_path / "out")
  assert sorted(os.listdir(tmp_path)) == ["hf", "orbax", "out"]  # no temporaries left

  want = hf_logits(hf, IDS)
  cls = type(hf)
  back = cls.from_pretrained(str(tmp_path / "out"), dtype="float32").eval()
  np.testing.assert_array_equal(hf_logits(back, IDS), want)
  model = from_pretrained(tmp_path / "orbax", dtype=jnp.float32, moe_dispatch="dense")
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(IDS))), want, rtol=2e-4, atol=2e-4)


def test_bfloat16_release_round_trips_in_bfloat16(tmp_path):
  cfg = get_preset("tiny_v2_lite", num_nextn_predict_layers=0)
  save_hf(cfg, tmp_path / "f32")
  with SafetensorsDir(tmp_path / "f32") as src:
    tensors = {k: src.read(k).astype(jnp.bfloat16) for k in src.keys()}
  specs = [TensorSpec(k, v.dtype, v.shape) for k, v in tensors.items()]
  raw = json.loads((tmp_path / "f32" / "config.json").read_text())
  write_sharded(tmp_path / "bf16", specs, lambda s: tensors[s.name], max_shard_size="40KB",
                extra_files={"config.json": json.dumps(raw)})
  convert(tmp_path / "bf16", tmp_path / "orbax", dtype=jnp.bfloat16)
  meta = checkpoint.param_metadata(tmp_path / "orbax")
  assert {str(m.dtype) for m in meta.values()} == {"bfloat16"}
  export(tmp_path / "orbax", tmp_path / "out", max_shard_size="40KB")
  _same_tensors(tmp_path / "bf16", tmp_path / "out")


@pytest.mark.torch
def test_mtp_tensors_and_copies_round_trip(tmp_path):
  cfg = get_preset("tiny_v3")
  flat = {k: np.asarray(v) for k, v in flat_state(DeepseekForCausalLM(cfg, rngs=nnx.Rngs(1))).items()}
  checkpoint.save_params(tmp_path / "ours", cfg, flat, group_bytes=20_000)
  export(tmp_path / "ours", tmp_path / "hf", max_shard_size="100KB")
  mtp = f"model.layers.{cfg.num_hidden_layers}."
  with SafetensorsDir(tmp_path / "hf") as f:
    np.testing.assert_array_equal(f.read(mtp + "embed_tokens.weight"), flat["embed_tokens.embedding"])
    np.testing.assert_array_equal(f.read(mtp + "shared_head.head.weight"), flat["lm_head.kernel"].T)
    assert f.info(mtp + "eh_proj.weight").shape == (cfg.hidden_size, 2 * cfg.hidden_size)
    assert f.info(mtp + "mlp.experts.7.down_proj.weight").shape == (
        cfg.hidden_size, cfg.moe_intermediate_size)
  # transformers ignores the MTP layer and loads the rest.
  hf = transformers.DeepseekV3ForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype="float32")
  ours = DeepseekForCausalLM(cfg, rngs=nnx.Rngs(1))
  np.testing.assert_allclose(hf_logits(hf.eval(), IDS), np.asarray(ours(jnp.asarray(IDS))),
                             rtol=2e-4, atol=2e-4)
  got_cfg, got = load_hf(tmp_path / "hf", dtype=jnp.float32)
  assert got_cfg.num_nextn_predict_layers == 1 and set(got) == set(flat)
  for k, v in flat.items():
    np.testing.assert_array_equal(np.asarray(got[k]), v, err_msg=k)


def test_read_params_places_and_casts_as_the_targets_say(tmp_path):
  cfg = get_preset("tiny_v2", num_nextn_predict_layers=0)
  save_hf(cfg, tmp_path / "hf")
  convert(tmp_path / "hf", tmp_path / "orbax", dtype=jnp.float32)
  assert checkpoint.read_config(tmp_path / "orbax") == cfg
  flat = checkpoint.read_params(tmp_path / "orbax", default_targets(cfg, jnp.bfloat16))
  assert {str(v.dtype) for v in flat.values()} == {"bfloat16"}
  assert {v.sharding for v in flat.values()} == {
      jax.sharding.SingleDeviceSharding(jax.devices()[0])}
  _, ref = load_hf(tmp_path / "hf", dtype=jnp.bfloat16)
  assert set(ref) == set(flat)
  for k in ref:
    np.testing.assert_array_equal(np.asarray(ref[k]), np.asarray(flat[k]), err_msg=k)
  with pytest.raises(FileExistsError, match="not empty"):
    convert(tmp_path / "hf", tmp_path / "orbax")
  convert(tmp_path / "hf", tmp_path / "orbax", overwrite=True)  # now bfloat16
  assert {str(m.dtype) for m in checkpoint.param_metadata(tmp_path / "orbax").values()} == {
      "bfloat16"}


@pytest.mark.torch
def test_entries_cover_every_released_tensor(tmp_path):
  cfg = get_preset("tiny_v3", num_nextn_predict_layers=0)
  save_hf(cfg, tmp_path)
  with SafetensorsDir(tmp_path) as f:
    assert {n for e in names.entries(cfg) for n in e.hf} == set(f.keys())


def test_trainer_workdir_exports_to_the_released_layout(tmp_path):
  from deepseek_jax import trainer
  from deepseek_jax.train_config import TrainConfig
  corpus = os.path.dirname(json.__file__)
  trainer.train(TrainConfig(
      workdir=str(tmp_path / "run"), preset="tiny_v3", data=corpus, seq_len=32, batch_size=2,
      steps=1, log_every=1, warmup_steps=0, moe_dispatch="dense", peak_flops=1e11,
      progress=False, tensorboard=False))
  assert workdir.is_workdir(tmp_path / "run") and not checkpoint.is_model_checkpoint(
      tmp_path / "run")
  trained = flat_state(from_pretrained(tmp_path / "run", dtype=jnp.float32))
  cfg = workdir.read_config(tmp_path / "run")
  flat = workdir.read_params(tmp_path / "run", default_targets(cfg, jnp.float32))
  assert cfg.num_nextn_predict_layers == 1 and set(flat) == set(trained)
  export_any(tmp_path / "run", tmp_path / "hf")
  _, back = load_hf(tmp_path / "hf", dtype=jnp.float32)
  assert set(back) == set(trained)
  for k in trained:
    np.testing.assert_array_equal(np.asarray(back[k]), np.asarray(trained[k]), err_msg=k)
