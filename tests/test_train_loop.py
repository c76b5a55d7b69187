"""The training loop end to end (in process): convergence, metrics, TensorBoard files, NaN stop."""

from __future__ import annotations

import glob
import json
import os
import struct

import numpy as np
import pytest

from deepseek_jax import metrics, trainer
from deepseek_jax.train_config import TrainConfig

CORPUS = os.path.dirname(json.__file__)  # the standard library's json package: ~48k bytes of code


def _cfg(workdir, **kw):
  base = dict(preset="tiny_v3", data=CORPUS, seq_len=64, batch_size=8, learning_rate=3e-3,
              warmup_steps=20, workdir=str(workdir), moe_dispatch="dense", peak_flops=1e11,
              progress=False)
  base.update(kw)
  return TrainConfig(**base)


def _read_events(path):
  """(step, {tag: value}) of every event: TFRecord framing (length, data, CRCs unchecked)."""
  from tensorboardX.proto import event_pb2
  out, data, pos = [], open(path, "rb").read(), 0
  while pos < len(data):
    (n,) = struct.unpack("<Q", data[pos:pos + 8])
    event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
    pos += 16 + n
    out.append((event.step, {v.tag: v.simple_value for v in event.summary.value}))
  return out


def test_training_lowers_loss_logs_metrics_and_resumes_nothing(tmp_path):
  tc = _cfg(tmp_path, steps=300, log_every=10, save_every=150)
  last = trainer.train(tc)
  recs = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in recs] == [1] + list(range(10, 301, 10))
  first, tail = recs[0], recs[-5:]
  assert first["loss"] > 5.5                                  # ~ln(512) at initialisation
  final_loss = np.mean([r["loss"] for r in tail])
  assert final_loss < 2.8, final_loss                         # seen: ~2.2 after 300 steps
  assert np.mean([r["mtp_loss"] for r in tail]) < 0.5 * first["mtp_loss"]  # MTP logged, falls
  for key in ("mtp_loss", "mtp_loss_1", "aux_loss", "grad_norm", "lr", "tokens_per_s", "mfu",
              "load_min/layer1", "load_max/layer2", "load_cv/mtp0"):
    assert all(np.isfinite(r[key]) for r in recs), key
  assert last == recs[-1]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["150", "300"]
  events = _read_events(glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))[0])
  logged = {}
  for step, s in events:
    logged.setdefault(step, {}).update(s)
  assert sorted(k for k, v in logged.items() if v) == [r["step"] for r in recs]
  np.testing.assert_allclose(logged[300]["loss"], recs[-1]["loss"], rtol=1e-6)
  # the same command again: already at --steps, nothing trained, same answer
  assert trainer.train(tc)["step"] == 300
  assert len(metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))) == len(recs)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  # warmup 2: the first update uses lr 0, the second 5e29, and the third step's loss overflows
  tc = _cfg(tmp_path, steps=10, warmup_steps=2, learning_rate=1e30, clip_norm=0.0,
            save_every=2, log_every=1)
  with pytest.raises(FloatingPointError, match=r"at step 3: stopping; the last good checkpoint "
                                               r"is step 2"):
    trainer.train(tc)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
  assert all(np.isfinite(r["loss"]) for r in metrics.read_jsonl(str(tmp_path / "metrics.jsonl")))


def test_bad_inputs(tmp_path):
  with pytest.raises(FileNotFoundError, match="--data=.*missing: no such file"):
    trainer.train(_cfg(tmp_path, data=str(tmp_path / "missing"), steps=1))
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "a.py").write_text("")
  with pytest.raises(ValueError, match="empty corpus"):
    trainer.train(_cfg(tmp_path / "w1", data=str(empty), steps=1))
  with pytest.raises(ValueError, match="--seq_len=300 is above the model's max_position_embeddings"
                                       "=256"):
    trainer.train(_cfg(tmp_path / "w2", seq_len=300, steps=1))
  small = tmp_path / "small.txt"
  small.write_text("x" * 100)
  with pytest.raises(ValueError, match="--seq_len=200 is larger than the corpus"):
    trainer.train(_cfg(tmp_path / "w3", data=str(small), seq_len=200, steps=1))
  with pytest.raises(ValueError, match="not divisible by --grad_accum=3"):
    trainer.train(_cfg(tmp_path / "w4", grad_accum=3, steps=1))
  with pytest.raises(ValueError, match="no model: pass --preset"):
    trainer.train(_cfg(tmp_path / "w5", preset=None, steps=1))
  with pytest.raises(ValueError, match="compute_dtype='float16'"):
    trainer.train(_cfg(tmp_path / "w6", compute_dtype="float16", steps=1))
  with pytest.raises(FileNotFoundError, match="--init_from=.*nowhere"):
    trainer.train(_cfg(tmp_path / "w7", init_from=str(tmp_path / "nowhere"), steps=1))


def test_batch_must_divide_over_data_parallel_devices():
  from deepseek_jax import get_preset
  cfg = get_preset("tiny_v3")
  tc = TrainConfig(preset="tiny_v3", batch_size=6, grad_accum=2, seq_len=16)
  with pytest.raises(ValueError, match=r"--batch_size=6 \(micro-batch 3 with --grad_accum=2\) is "
                                       r"not divisible by the data-parallel size 2"):
    trainer.check_inputs(tc, cfg, n_batch_shards=2)
  trainer.check_inputs(tc, cfg, n_batch_shards=3)
