"""from_pretrained(mesh=...) on 8 host CPU devices (in a subprocess): a released-layout directory
and an Orbax checkpoint load straight into the rules' shardings and give the one-device logits
and greedy generations."""

import jax.numpy as jnp
from sharding_worker import run as run_worker

from convert.to_orbax import convert
from deepseek_jax import get_preset
from hf_reference import save_hf


def test_sharded_from_pretrained_equals_one_device(tmp_path):
  cfg = get_preset("tiny_v3", num_hidden_layers=2, num_nextn_predict_layers=0)
  save_hf(cfg, tmp_path / "hf", seed=4, max_shard_size="60KB")
  convert(tmp_path / "hf", tmp_path / "orbax", dtype=jnp.float32)
  rows = run_worker("pretrained", str(tmp_path / "hf"), str(tmp_path / "orbax"))
  assert [(r["source"], r["scan"]) for r in rows] == [
      ("safetensors", False), ("orbax", False), ("orbax", True)]
  for r in rows:
    assert r["logits_err"] < 1e-5, r
    assert r["same_generation"], r  # greedy generation on the mesh gives the one-device tokens
    assert r["wrong"] == [], r  # every parameter placed as sharding.model_shardings says
    e_dim = 1 if r["scan"] else 0  # [L, E, ...] when scanned
    assert r["expert_shard"][e_dim] * 4 == r["expert_shape"][e_dim], r  # experts over expert=4
