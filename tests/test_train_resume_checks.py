"""Resuming a workdir compares before it restores: another model config is named in one line
(it was a 58-line Orbax tree dump), and changed run settings (sequence length, batch, data) are
refused unless --allow_resume_changes (they used to continue silently)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from deepseek_jax import get_preset, trainer
from deepseek_jax.train_config import TrainConfig

CORPUS = os.path.dirname(json.__file__)
FLAGS = dict(preset="tiny_v3", data=CORPUS, seq_len=16, batch_size=2, steps=2, save_every=2,
             log_every=1, moe_dispatch="dense", peak_flops=1e11, progress=False,
             tensorboard=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  w = tmp_path_factory.mktemp("run") / "w"
  trainer.train(TrainConfig(**FLAGS, workdir=str(w)), echo=lambda m: None)
  return w


@pytest.fixture
def workdir(trained, tmp_path):
  w = tmp_path / "w"
  shutil.copytree(trained, w)
  return w


def test_another_model_config_is_named_in_one_line(workdir, tmp_path):
  get_preset("tiny_v3", hidden_size=96).save(tmp_path / "cfg")
  flags = dict(FLAGS, preset=None, config_json=str(tmp_path / "cfg"), steps=3)
  with pytest.raises(ValueError) as e:
    trainer.train(TrainConfig(**flags, workdir=str(workdir)), echo=lambda m: None)
  msg = str(e.value)  # a ValueError: the CLI prints it as one line (tests/test_cli.py)
  assert "another model config (hidden_size: 64 -> 96)" in msg and "\n" not in msg, msg


def test_changed_run_settings_are_refused_unless_allowed(workdir, tmp_path):
  other = tmp_path / "corpus"
  other.mkdir()
  (other / "a.txt").write_text("another corpus entirely " * 50)
  for change, says in [(dict(seq_len=32), "--seq_len: 16 -> 32"),
                       (dict(batch_size=4), "--batch_size: 2 -> 4"),
                       (dict(data=str(other)), "--data/--tokenizer")]:
    with pytest.raises(ValueError, match="--allow_resume_changes") as e:
      trainer.train(TrainConfig(**{**FLAGS, **change, "steps": 3}, workdir=str(workdir)),
                    echo=lambda m: None)
    assert says in str(e.value), str(e.value)
  said = []
  last = trainer.train(TrainConfig(**{**FLAGS, "seq_len": 32, "steps": 3},
                                   allow_resume_changes=True, workdir=str(workdir)),
                       echo=said.append)
  assert last["step"] == 3
  assert any("--seq_len: 16 -> 32" in m for m in said) and any("afresh" in m for m in said)
  # the next resume compares with the run that saved last (nothing left to do: no compile)
  last = trainer.train(TrainConfig(**{**FLAGS, "seq_len": 32, "steps": 3},
                                   workdir=str(workdir)), echo=said.append)
  assert last["step"] == 3 and "nothing to do" in said[-1]
