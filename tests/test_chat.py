"""Chat data: template rendering, assistant-only loss masks, packing with segment ids."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax import chat, get_preset
from deepseek_jax.model import DeepseekForCausalLM
from deepseek_jax.tokenizer import ByteTokenizer
from deepseek_jax.train_config import TrainConfig
from deepseek_jax.train_step import make_loss_fn

TOK = ByteTokenizer()
TEMPLATE = chat.ChatTemplate(chat.DEEPSEEK_TEMPLATE, TOK)
CONVS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue"}],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": "yz"}],
]


def test_render_and_mask_cover_exactly_the_replies():
  text = TEMPLATE.render(CONVS[0])
  assert text == ("<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜>Hello!"
                  "<｜end▁of▁sentence｜><｜User｜>2+2?<｜Assistant｜>4<｜end▁of▁sentence｜>")
  ids, mask = TEMPLATE.encode(CONVS[0])
  assert TOK.encode(text) == ids.tolist()
  assert TOK.decode(ids[mask]) == "Hello!4" and (ids[mask] == TOK.eos_id).sum() == 2
  assert TEMPLATE.prompt(CONVS[0][:2])[-len("<｜Assistant｜>".encode()):] == list(
      "<｜Assistant｜>".encode())


def test_template_from_the_checkpoint_and_bad_rows(tmp_path):
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"chat_template": "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
                        "{% if add_generation_prompt %}[assistant]{% endif %}"}))
  t = chat.ChatTemplate(chat.read_template(tmp_path), TOK)
  assert t.render(CONVS[1], add_generation_prompt=False) == "[user]Name a colour.[assistant]Blue"
  ids, mask = t.encode(CONVS[1])
  assert TOK.decode(ids[mask]) == "Blue"
  assert chat.read_template(tmp_path / "nothing") == chat.DEEPSEEK_TEMPLATE
  data = tmp_path / "d.jsonl"
  data.write_text('{"messages": [{"role": "user", "content": "a"}]}\n')
  with pytest.raises(ValueError, match=r"d.jsonl:1: messages: no assistant message"):
    chat.read_conversations(data, "chat")
  data.write_text('{"prompt": "a"}\n')
  with pytest.raises(ValueError, match=r"d.jsonl:1: expected .*completion"):
    chat.read_conversations(data, "prompt_completion")
  data.write_text('{"prompt": "a", "completion": "b"}\n')
  assert chat.read_conversations(data, "prompt_completion") == [
      [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]]


def test_segment_positions_restart():
  seg = np.array([[1, 1, 1, 2, 2, 3, 0, 0]])
  np.testing.assert_array_equal(chat.segment_positions(seg), [[0, 1, 2, 0, 1, 0, 0, 1]])


@pytest.fixture(scope="module")
def loss_fn():
  cfg = get_preset("tiny_v3", moe_dispatch="dense")
  model = DeepseekForCausalLM(cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  fn = make_loss_fn(graphdef, cfg, TrainConfig(mtp_weight=0.3))
  return jax.jit(lambda batch: fn(params, rest, batch)[1][0])


def test_packed_conversations_have_their_unpacked_losses(loss_fn):
  """Each conversation alone, and all three packed in one row: the same loss per conversation
  (attention and MTP targets never cross segments; positions restart)."""
  encoded = [TEMPLATE.encode(c) for c in CONVS]
  row = sum(len(i) for i, _ in encoded) + 5
  packed = chat.pack(encoded, row, TOK.pad_id)
  assert packed["tokens"].shape == (1, row) and packed["segment_ids"].max() == 3

  def logs(rows, keep=None):
    batch = {k: jnp.asarray(v) for k, v in rows.items()}
    if keep is not None:  # only the targets of one segment count
      batch["loss_mask"] = batch["loss_mask"] * (batch["segment_ids"] == keep)
    return loss_fn(batch)

  for s, enc in enumerate(encoded, start=1):
    alone = logs(chat.pack([enc], row, TOK.pad_id))
    together = logs(packed, keep=s)
    np.testing.assert_allclose(float(together["loss"]), float(alone["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(together["mtp_loss"]), float(alone["mtp_loss"]), rtol=1e-5)


def test_only_assistant_tokens_are_targets(loss_fn):
  """The loss is the mean CE over exactly the assistant tokens (computed here from the logits
  by hand); tokens after the conversation (padding) are neither targets nor context."""
  cfg = get_preset("tiny_v3", moe_dispatch="dense")
  model = DeepseekForCausalLM(cfg, rngs=nnx.Rngs(0))
  ids, mask = TEMPLATE.encode(CONVS[0])
  rows = chat.pack([(ids, mask)], len(ids) + 3, TOK.pad_id)
  base = loss_fn({k: jnp.asarray(v) for k, v in rows.items()})
  logits = model(jnp.asarray(ids[None, :-1]))[0]                      # [T, V]
  ce = -jax.nn.log_softmax(logits)[jnp.arange(len(ids) - 1), ids[1:]]
  want = float(jnp.sum(ce * mask[1:]) / mask[1:].sum())
  np.testing.assert_allclose(float(base["loss"]), want, rtol=1e-5)
  changed = dict(rows, tokens=rows["tokens"].copy())
  changed["tokens"][0, len(ids):] = 5  # the padding after the conversation
  np.testing.assert_allclose(
      float(loss_fn({k: jnp.asarray(v) for k, v in changed.items()})["loss"]),
      float(base["loss"]), rtol=1e-6)


def test_conversations_cut_before_their_reply_are_named(tmp_path):
  from deepseek_jax import train_data

  data = tmp_path / "long.jsonl"
  data.write_text(json.dumps({"messages": CONVS[1]}) + "\n")
  n = len(TEMPLATE.encode(CONVS[1])[0])
  ok = TrainConfig(data=str(data), data_format="chat", seq_len=n - 1)
  assert len(train_data.chat_rows(str(data), ok, TOK)) == 1
  short = TrainConfig(data=str(data), data_format="chat", seq_len=8)
  with pytest.raises(ValueError, match=rf"long.jsonl: no assistant tokens .*1 of 1 conversations "
                                       rf"are longer than --seq_len \+ 1 = 9 tokens, the longest {n}"):
    train_data.chat_rows(str(data), short, TOK)
