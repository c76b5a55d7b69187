"""Byte tokenizer round trips; tokenizer.json wrapper; load_tokenizer's errors."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from deepseek_jax.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer


@settings(max_examples=50, deadline=None)
@given(st.text())
def test_byte_round_trip(text):
  tok = ByteTokenizer()
  ids = tok.encode(text)
  assert all(0 <= i < 256 for i in ids)
  assert tok.decode(ids) == text


def test_byte_specials_are_dropped_and_fit_tiny_vocab():
  tok = ByteTokenizer()
  assert {tok.bos_id, tok.eos_id, tok.pad_id} == {256, 257, 258}
  assert tok.vocab_size == 259 <= 512
  assert tok.decode([tok.bos_id] + tok.encode("héllo") + [tok.eos_id, tok.pad_id]) == "héllo"
  assert tok.decode(tok.encode("é")[:1]) == "\ufffd"  # a cut character does not raise


def _write_tokenizer_json(directory):
  import tokenizers
  from tokenizers import models, pre_tokenizers, trainers

  tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["def f(x):\n  return x + 1\n"] * 20, trainer)
  path = directory / "tokenizer.json"
  tok.save(str(path))
  return path


def test_hf_tokenizer_round_trip_and_specials(tmp_path):
  path = _write_tokenizer_json(tmp_path)
  tok = load_tokenizer(tmp_path)  # a directory holding tokenizer.json
  assert isinstance(tok, HFTokenizer)
  assert tok.bos_id == tok._tok.token_to_id("<s>")
  assert tok.eos_id == tok._tok.token_to_id("</s>")
  assert tok.pad_id == tok._tok.token_to_id("<pad>")
  text = "def f(x):\n  return x + 2\n"
  ids = tok.encode(text)
  assert tok.eos_id not in ids
  assert tok.decode(ids) == text
  assert load_tokenizer(path).encode(text) == ids


def test_hf_tokenizer_config_names_specials(tmp_path):
  _write_tokenizer_json(tmp_path)
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<pad>"}}))
  tok = load_tokenizer(tmp_path)
  assert tok.eos_id == tok._tok.token_to_id("<pad>")


def test_load_tokenizer_errors(tmp_path):
  assert isinstance(load_tokenizer("byte"), ByteTokenizer)
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    load_tokenizer(tmp_path)
  with pytest.raises(FileNotFoundError, match="expected 'byte'"):
    load_tokenizer(tmp_path / "missing.json")
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(ValueError, match="not a valid tokenizer.json"):
    load_tokenizer(bad)
