"""from_pretrained(mesh=...) on 8 host CPU devices (in a subprocess): a released-layout directory,
an Orbax checkpoint and a trainer workdir (saved in the scanned layout) load straight into the
rules' shardings, in either layer layout, and give the one-device logits and greedy generations."""

import json
import os

import jax.numpy as jnp
from sharding_worker import run as run_worker

from deepseek_jax import get_preset, trainer
from deepseek_jax.convert.to_orbax import convert
from deepseek_jax.train_config import TrainConfig
from hf_reference import save_hf


def test_sharded_from_pretrained_equals_one_device(tmp_path):
  cfg = get_preset("tiny_v3", num_hidden_layers=2, num_nextn_predict_layers=0)
  save_hf(cfg, tmp_path / "hf", seed=4, max_shard_size="60KB")
  convert(tmp_path / "hf", tmp_path / "orbax", dtype=jnp.float32)
  # a workdir whose weights are the release's: one step at learning rate 0, saved scanned
  trainer.train(TrainConfig(
      init_from=str(tmp_path / "hf"), workdir=str(tmp_path / "run"), scan_layers=True,
      data=os.path.dirname(json.__file__), seq_len=16, batch_size=2, steps=1, learning_rate=0.0,
      warmup_steps=0, bias_update_speed=0.0, peak_flops=1e11, progress=False,
      tensorboard=False, tokenizer="byte"), echo=lambda _: None)
  rows = run_worker("pretrained", str(tmp_path / "hf"), str(tmp_path / "orbax"),
                    str(tmp_path / "run"))
  assert [(r["source"], r["scan"]) for r in rows] == [
      ("safetensors", False), ("orbax", False), ("orbax", True), ("workdir", False),
      ("workdir", True)]
  for r in rows:
    assert r["logits_err"] < 1e-5, r
    assert r["same_generation"], r  # greedy generation on the mesh gives the one-device tokens
    assert r["wrong"] == [], r  # every parameter placed as sharding.model_shardings says
    e_dim = 1 if r["scan"] else 0  # [L, E, ...] when scanned
    assert r["expert_shard"][e_dim] * 4 == r["expert_shape"][e_dim], r  # experts over expert=4
