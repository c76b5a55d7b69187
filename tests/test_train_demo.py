"""`make demo` end to end at a smaller size: trains, checkpoints, reloads, generates; off a
terminal it prints a line per logged interval, and the paths it prints load."""

from __future__ import annotations

import logging
import os
import re

import numpy as np

from deepseek_jax import demo
from deepseek_jax.pretrained import from_pretrained
from deepseek_jax.tokenizer import ByteTokenizer, tokenizer_for_model


def test_demo_runs_end_to_end(tmp_path, capsys, caplog):
  out = demo.run_demo(str(tmp_path / "demo"), steps=12, seq_len=32, batch_per_device=4,
                      max_corpus_mb=1, new_tokens=8)
  captured = capsys.readouterr()
  printed = captured.out
  assert "loss at the start" in printed and demo.PROMPT in printed
  assert out["last_loss"] < out["first_loss"]
  assert 0 < len(out["completion"].encode()) <= 8 * 4  # 8 bytes, each at most a U+FFFD
  assert os.path.isdir(tmp_path / "demo" / "checkpoints" / "12")
  # not a terminal: progress as lines (it was silent for minutes), with an ETA once it can tell
  assert re.search(r"step 6/12: loss [\d.]+, [\d,]+ tokens/s, ETA \d+s", captured.err), captured.err
  # the checkpoint path and the generate command it prints both load (the step path was refused)
  step_dir = re.search(r"checkpoint: (\S+)", printed).group(1)
  model_dir = re.search(r"--model_dir=(\S+)", printed).group(1)
  a, b = from_pretrained(step_dir), from_pretrained(model_dir)
  ids = [[1, 2, 3]]
  np.testing.assert_array_equal(np.asarray(a(ids)), np.asarray(b(ids)))
  assert isinstance(tokenizer_for_model(model_dir, a.cfg.vocab_size), ByteTokenizer)
  # nothing for the user to wonder about: no Orbax warning (reading a step's state item through
  # a Checkpointer warned of a missing metadata file at every load)
  warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert not warned, warned
