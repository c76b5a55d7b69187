"""--init_from: a released-layout safetensors directory (loss equals transformers'), an Orbax
checkpoint of ours, or a trainer workdir."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.convert.to_orbax import convert
from deepseek_jax import data, from_pretrained, get_preset, losses, metrics, trainer
from deepseek_jax.tokenizer import ByteTokenizer
from deepseek_jax.train_config import TrainConfig
from hf_reference import hf_logits, save_hf

CORPUS = os.path.dirname(json.__file__)
COMMON = dict(data=CORPUS, seq_len=32, batch_size=4, steps=1, log_every=1, warmup_steps=0,
              moe_dispatch="dense", peak_flops=1e11, progress=False, tensorboard=False,
              tokenizer="byte")  # the tiny releases carry no tokenizer


def _first_batch(tmp_path, tc):
  ds = data.make_dataset(CORPUS, ByteTokenizer(), tc.seq_len, str(tmp_path / "cache"))
  return next(data.DataIterator(ds, tc.batch_size, tc.seed))              # [B, T+1]


@pytest.mark.torch
@pytest.mark.parametrize("source", ["safetensors", "orbax"])
def test_init_from_released_layout_matches_transformers_loss(tmp_path, source):
  import torch  # the oracle's loss (marked torch)
  cfg = get_preset("tiny_v3")
  hf = save_hf(cfg, tmp_path / "hf")  # transformers writes no MTP tensors: we load without MTP
  init_from = str(tmp_path / "hf")
  if source == "orbax":  # the converted checkpoint (python -m deepseek_jax.convert.hf_to_orbax)
    init_from = convert(init_from, tmp_path / "orbax", dtype=jnp.float32)
  tc = TrainConfig(init_from=init_from, workdir=str(tmp_path / "run"), **COMMON)
  trainer.train(tc)
  ours = metrics.read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))[0]
  assert ours["step"] == 1 and "mtp_loss_1" not in ours
  tokens = _first_batch(tmp_path, tc)
  logits = hf_logits(hf, tokens[:, :-1])                                  # [B, T, V]
  want = torch.nn.functional.cross_entropy(
      torch.from_numpy(logits).reshape(-1, logits.shape[-1]),
      torch.from_numpy(tokens[:, 1:].astype(np.int64)).reshape(-1)).item()
  np.testing.assert_allclose(ours["loss"], want, rtol=2e-5)


def test_init_from_trainer_workdir(tmp_path):
  base = dict(COMMON, preset="tiny_v3", learning_rate=1e-2)
  trainer.train(TrainConfig(workdir=str(tmp_path / "a"), **{**base, "steps": 2}))
  tc = TrainConfig(workdir=str(tmp_path / "b"), init_from=str(tmp_path / "a"),
                   **{**base, "preset": None, "seed": 5})
  trainer.train(tc)
  first = metrics.read_jsonl(str(tmp_path / "b" / "metrics.jsonl"))[0]
  model = from_pretrained(tmp_path / "a", dtype=jnp.float32)  # a's parameters after 2 steps
  tokens = jnp.asarray(_first_batch(tmp_path, tc))
  want, _ = losses.cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
  np.testing.assert_allclose(first["loss"], float(want), rtol=1e-5)
