"""from_pretrained and the name table: completeness, MTP tensors, clear errors."""

import json
import logging

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from deepseek_jax.convert import names
from deepseek_jax import get_preset
from deepseek_jax.model import DeepseekForCausalLM
from deepseek_jax.params import flat_state
from deepseek_jax.pretrained import from_pretrained
from hf_reference import save_hf


def _export(cfg, flat, directory):
  """Writes our parameters in the released layout (MTP copies included) with the name table."""
  tensors = {}
  for entry in names.entries(cfg):
    tensors.update(entry.to_hf(np.asarray(flat[entry.ours])))
  for entry in names.mtp_copies(cfg):
    tensors.update(entry.to_hf(np.asarray(flat[entry.ours])))
  save_file(tensors, str(directory / "model.safetensors"))
  cfg.save(directory)
  return tensors


@pytest.mark.torch
@pytest.mark.parametrize("name", ["tiny_v3", "tiny_v2", "tiny_v2_lite"])
def test_table_covers_exactly_what_transformers_writes(name, tmp_path):
  cfg = get_preset(name, num_nextn_predict_layers=0)
  save_hf(cfg, tmp_path)
  with safe_open(str(tmp_path / "model.safetensors"), framework="numpy") as f:
    written = set(f.keys())
  ours = {n for e in names.entries(cfg) for n in e.hf}
  assert ours == written


def test_missing_mtp_loads_without_mtp_and_warns_once(tmp_path, caplog):
  cfg = get_preset("tiny_v3")
  save_hf(cfg, tmp_path)  # transformers writes no MTP tensors
  with caplog.at_level(logging.WARNING):
    model = from_pretrained(tmp_path, dtype=jnp.float32)
  assert model.cfg.num_nextn_predict_layers == 0 and len(model.mtp) == 0
  warnings = [r for r in caplog.records if "MTP" in r.getMessage()]
  assert len(warnings) == 1


def test_mtp_round_trip_through_released_names(tmp_path):
  cfg = get_preset("tiny_v3")
  model = DeepseekForCausalLM(cfg, rngs=nnx.Rngs(3))
  flat = flat_state(model)
  tensors = _export(cfg, flat, tmp_path)
  mtp_prefix = f"model.layers.{cfg.num_hidden_layers}."
  for n in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
            "shared_head.head.weight", "embed_tokens.weight", "mlp.gate.e_score_correction_bias",
            "mlp.experts.7.down_proj.weight", "self_attn.kv_a_proj_with_mqa.weight"):
    assert mtp_prefix + n in tensors, n
  assert tensors[mtp_prefix + "eh_proj.weight"].shape == (cfg.hidden_size, 2 * cfg.hidden_size)
  loaded = from_pretrained(tmp_path, dtype=jnp.float32)
  got = flat_state(loaded)
  assert set(got) == set(flat)
  for k in flat:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(flat[k]), err_msg=k)
  ids = jnp.asarray([[5, 9, 2, 7, 1]], jnp.int32)
  np.testing.assert_array_equal(loaded.forward(ids).mtp_logits[0], model.forward(ids).mtp_logits[0])


def test_missing_and_misshapen_tensors_are_named(tmp_path):
  cfg = get_preset("tiny_v2_lite")
  flat = flat_state(DeepseekForCausalLM(cfg, rngs=nnx.Rngs(0)))
  tensors = _export(cfg, flat, tmp_path)
  victim = "model.layers.1.mlp.experts.3.up_proj.weight"
  save_file({k: v for k, v in tensors.items() if k != victim}, str(tmp_path / "model.safetensors"))
  with pytest.raises(KeyError, match="experts.3.up_proj"):
    from_pretrained(tmp_path, dtype=jnp.float32)
  bad = dict(tensors)
  bad[victim] = bad[victim][:, :-1].copy()
  save_file(bad, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match="experts.3.up_proj"):
    from_pretrained(tmp_path, dtype=jnp.float32)


def test_not_a_model_directory(tmp_path):
  with pytest.raises(FileNotFoundError):
    from_pretrained(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="config.json"):
    from_pretrained(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(get_preset("tiny_v3").to_hf()))
  with pytest.raises(FileNotFoundError, match="safetensors"):
    from_pretrained(tmp_path)
