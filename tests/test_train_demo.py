"""`make demo` end to end at a smaller size: trains, checkpoints, reloads, generates."""

from __future__ import annotations

import os

from deepseek_jax import demo


def test_demo_runs_end_to_end(tmp_path, capsys):
  out = demo.run_demo(str(tmp_path / "demo"), steps=12, seq_len=32, batch_per_device=4,
                      max_corpus_mb=1, new_tokens=8)
  printed = capsys.readouterr().out
  assert "loss at the start" in printed and demo.PROMPT in printed
  assert out["last_loss"] < out["first_loss"]
  assert 0 < len(out["completion"].encode()) <= 8 * 4  # 8 bytes, each at most a U+FFFD
  assert os.path.isdir(tmp_path / "demo" / "checkpoints" / "12")
