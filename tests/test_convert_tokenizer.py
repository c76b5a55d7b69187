"""The tokenizer travels with the model: both converters carry its files (chat template included),
and a model with a real vocabulary but no tokenizer is refused instead of decoded as bytes."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import pytest

from deepseek_jax import get_preset
from deepseek_jax.convert.to_hf import export
from deepseek_jax.convert.to_orbax import convert
from deepseek_jax.tokenizer import (BYTE_TOKENIZER_FILE, ByteTokenizer, HFTokenizer,
                                    save_tokenizer, tokenizer_for_model)
from hf_reference import save_hf

CHAT_TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  """A tiny release with a tokenizer.json and a tokenizer_config.json holding a chat template."""
  tokenizers = pytest.importorskip("tokenizers")
  d = tmp_path_factory.mktemp("release") / "hf"
  save_hf(get_preset("tiny_v2_lite", num_nextn_predict_layers=0), d)
  vocab = {w: i for i, w in enumerate(["[UNK]", "<s>", "</s>", "hello", "world"])}
  t = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  t.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  t.save(str(d / "tokenizer.json"))
  (d / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE}))
  return d


def test_both_converters_carry_the_tokenizer(release, tmp_path):
  """Before: neither carried it, and generate on the converted model fell back to bytes."""
  ours = convert(release, tmp_path / "orbax", dtype=jnp.float32)
  back = tmp_path / "hf"
  export(ours, back)
  for d in (ours, back):
    for name in ("tokenizer.json", "tokenizer_config.json"):
      assert (release / name).read_bytes() == open(os.path.join(d, name), "rb").read(), (d, name)
    tok = tokenizer_for_model(d, vocab_size=512)
    assert isinstance(tok, HFTokenizer) and tok.encode("hello world") == [3, 4]
    assert (tok.bos_id, tok.eos_id) == (1, 2)
  assert json.loads((back / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE


def test_no_tokenizer_and_a_real_vocabulary_is_refused(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"no tokenizer.json .*\(it has 512 ids, more than 259\)"):
    tokenizer_for_model(tmp_path, vocab_size=512)
  with pytest.raises(FileNotFoundError, match="--tokenizer=byte"):
    tokenizer_for_model(tmp_path)
  assert isinstance(tokenizer_for_model(tmp_path, vocab_size=259), ByteTokenizer)
  save_tokenizer(ByteTokenizer(), tmp_path)  # what the trainer writes into its workdir
  assert (tmp_path / BYTE_TOKENIZER_FILE).is_file()
  assert isinstance(tokenizer_for_model(tmp_path, vocab_size=512), ByteTokenizer)


def test_save_tokenizer_copies_a_tokenizer_json_and_its_config(release, tmp_path):
  save_tokenizer(HFTokenizer(str(release / "tokenizer.json")), tmp_path)
  assert sorted(os.listdir(tmp_path)) == ["tokenizer.json", "tokenizer_config.json"]
  assert tokenizer_for_model(tmp_path, 512).encode("world hello") == [4, 3]
