"""Chat data for fine-tuning and chat prompts for generation.

Rows (JSONL): `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}` or
`{"prompt": "...", "completion": "..."}` (a user message and the assistant's reply).

Rendering follows transformers' `apply_chat_template`: the checkpoint's `chat_template` from
`tokenizer_config.json` (jinja2, sandboxed, trim_blocks and lstrip_blocks, `raise_exception`),
with `messages`, `bos_token`, `eos_token` and `add_generation_prompt`; without one, DeepSeek-V3's
format is built in (`DEEPSEEK_TEMPLATE`). The loss goes on assistant tokens only: a
conversation is rendered prefix by prefix, and the text each assistant message adds after the
generation prompt is its span; every span is tokenized on its own, so the mask fits the tokens
exactly.

Packing (`pack`): conversations go into rows of `seq_len + 1` tokens one after another, each with
its own segment id (1, 2, ...; 0 is padding); attention never crosses segments and positions
restart in each (`segment_positions`).

Legend: R rows, L seq_len + 1 tokens per row.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from deepseek_jax.json_file import read_json_object
from deepseek_jax.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")

# DeepSeek-V3's chat format (no tool calls): the system prompt after bos, then user turns after
# "<｜User｜>" and assistant turns after "<｜Assistant｜>", each assistant turn closed by eos.
DEEPSEEK_TEMPLATE = (
    "{% set ns = namespace(system='') %}"
    "{% for m in messages if m['role'] == 'system' %}"
    "{% set ns.system = ns.system + ('\n\n' if ns.system else '') + m['content'] %}"
    "{% endfor %}"
    "{{ bos_token }}{{ ns.system }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' + m['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}")


def read_template(model_dir: str | os.PathLike | None) -> str:
  """The `chat_template` of `model_dir`'s tokenizer_config.json, else DEEPSEEK_TEMPLATE."""
  if model_dir is None:
    return DEEPSEEK_TEMPLATE
  path = os.path.join(os.fspath(model_dir), "tokenizer_config.json")
  if not os.path.isfile(path):
    return DEEPSEEK_TEMPLATE
  template = read_json_object(path).get("chat_template")
  if isinstance(template, list):  # several named templates: the default one
    template = next((t.get("template") for t in template if t.get("name") == "default"), None)
  return template if isinstance(template, str) and template else DEEPSEEK_TEMPLATE


class ChatTemplate:
  """A compiled chat template bound to a tokenizer's special tokens."""

  def __init__(self, template: str, tokenizer: Tokenizer):
    import jinja2  # a dependency of chat use only
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
      raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
    try:
      self._template = env.from_string(template)
    except jinja2.TemplateError as e:
      raise ValueError(f"chat template does not compile: {e}") from e
    self.tokenizer = tokenizer

  def render(self, messages: Sequence[dict], *, add_generation_prompt: bool = False) -> str:
    tok = self.tokenizer
    return self._template.render(messages=list(messages), bos_token=tok.bos_token or "",
                                 eos_token=tok.eos_token or "",
                                 add_generation_prompt=add_generation_prompt)

  def encode(self, messages: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(token ids [T] int32, loss mask [T] bool: True on the tokens of assistant replies)."""
    messages = check_messages(messages)
    ids: list[int] = []
    mask: list[bool] = []
    done = ""
    for i, m in enumerate(messages):
      assistant = m["role"] == "assistant"
      before = self.render(messages[:i], add_generation_prompt=assistant) if i else ""
      text = self.render(messages[:i + 1])
      for piece, is_reply in ((before, False), (text, assistant)):
        if not piece.startswith(done):
          raise ValueError("chat template: rendering a longer conversation changed an earlier "
                           "part; cannot tell which tokens are the assistant's")
        new = self.tokenizer.encode(piece[len(done):])
        ids += new
        mask += [is_reply] * len(new)
        done = piece
    return np.asarray(ids, np.int32), np.asarray(mask, bool)

  def prompt(self, messages: Sequence[dict]) -> list[int]:
    """Token ids of a conversation ending with a generation prompt (for `generate`)."""
    return self.tokenizer.encode(self.render(check_messages(messages, need_reply=False),
                                             add_generation_prompt=True))


def check_messages(messages: Any, *, need_reply: bool = True, where: str = "messages"
                   ) -> list[dict]:
  """The messages as a list of {"role", "content"} dicts; ValueError naming what is wrong."""
  if not isinstance(messages, list) or not messages:
    raise ValueError(f"{where}: expected a non-empty list of {{role, content}} objects")
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(
        m.get("content"), str):
      raise ValueError(f"{where}[{i}]: expected {{\"role\": one of {ROLES}, \"content\": str}}, "
                       f"got {m!r}"[:300])
    out.append({"role": m["role"], "content": m["content"]})
  if need_reply and not any(m["role"] == "assistant" for m in out):
    raise ValueError(f"{where}: no assistant message (nothing to train on)")
  return out


def jsonl_rows(path: str) -> Iterator[tuple[str, Any]]:
  """(where, row) for each non-blank line of a JSONL file, `where` being "path:line"; a line
  that is not JSON is a ValueError naming it."""
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}:{n}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from e
      yield where, row


def read_conversations(path: str | os.PathLike, data_format: str) -> list[list[dict]]:
  """Conversations from a JSONL file of `messages` rows (data_format "chat") or `prompt` /
  `completion` rows ("prompt_completion"); errors name the file and line."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file (expected JSONL chat data)")
  out = []
  for where, row in jsonl_rows(path):
    if data_format == "prompt_completion":
      if not (isinstance(row, dict) and isinstance(row.get("prompt"), str)
              and isinstance(row.get("completion"), str)):
        raise ValueError(f"{where}: expected {{\"prompt\": str, \"completion\": str}}")
      out.append([{"role": "user", "content": row["prompt"]},
                  {"role": "assistant", "content": row["completion"]}])
    else:
      if not isinstance(row, dict) or "messages" not in row:
        raise ValueError(f"{where}: expected {{\"messages\": [...]}}")
      out.append(check_messages(row["messages"], where=f"{where}: messages"))
  if not out:
    raise ValueError(f"{path}: no conversations")
  return out


def pack(examples: Iterable[tuple[np.ndarray, np.ndarray]], row_len: int, pad_id: int
         ) -> dict[str, np.ndarray]:
  """Greedy packing of (ids, mask) conversations into rows of `row_len` tokens.

  Returns {"tokens" [R, L] int32, "loss_mask" [R, L] bool (the token is an assistant token the
  loss counts as a target), "segment_ids" [R, L] int32 (0: padding)}. A conversation longer than
  a row is cut to `row_len` tokens.
  """
  rows, cur = [], []
  for ids, mask in examples:
    ids, mask = ids[:row_len], mask[:row_len]
    if cur and sum(len(i) for i, _ in cur) + len(ids) > row_len:
      rows.append(cur)
      cur = []
    cur.append((ids, mask))
  if cur:
    rows.append(cur)
  tokens = np.full((len(rows), row_len), pad_id, np.int32)
  loss_mask = np.zeros((len(rows), row_len), bool)
  segments = np.zeros((len(rows), row_len), np.int32)
  for r, row in enumerate(rows):
    t = 0
    for s, (ids, mask) in enumerate(row, start=1):
      tokens[r, t:t + len(ids)] = ids
      loss_mask[r, t:t + len(ids)] = mask
      segments[r, t:t + len(ids)] = s
      t += len(ids)
  return {"tokens": tokens, "loss_mask": loss_mask, "segment_ids": segments}


def segment_positions(segment_ids: np.ndarray) -> np.ndarray:
  """Positions restarting at 0 in every segment: [..., L] int32 (padding continues counting)."""
  seg = np.asarray(segment_ids)
  idx = np.broadcast_to(np.arange(seg.shape[-1]), seg.shape)
  start = np.where(np.concatenate([np.ones(seg.shape[:-1] + (1,), bool),
                                   seg[..., 1:] != seg[..., :-1]], axis=-1), idx, 0)
  return (idx - np.maximum.accumulate(start, axis=-1)).astype(np.int32)


def strip_thinking(text: str) -> str:
  """R1-style output without its reasoning: the text after the last `</think>`."""
  return text.split("</think>")[-1].lstrip("\n") if "</think>" in text else text
