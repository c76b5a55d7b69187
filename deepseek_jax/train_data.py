"""The trainer's data: the tokenizer, and the training and held-out sets for --data_format.

text: files of plain text, packed into windows (`data.PackedDataset`); every next token is a
target. chat / prompt_completion: JSONL conversations rendered with the model's chat template
(`chat`), packed with segment ids; only assistant tokens are targets. Both give batches of
rows [b, seq_len + 1] (`data.DataIterator`): a bare token array for text, a dict with
"tokens", "loss_mask" and "segment_ids" for chat.
"""

from __future__ import annotations

import os

import numpy as np

from deepseek_jax import chat
from deepseek_jax import data as data_lib
from deepseek_jax.tokenizer import load_tokenizer, tokenizer_for_model
from deepseek_jax.train_config import TrainConfig


def make_tokenizer(tc: TrainConfig, vocab_size: int):
  """--tokenizer, where "auto" means the one the --init_from directory carries (refused when it
  carries none and the model's `vocab_size` is not the byte tokenizer's), or bytes without it."""
  if tc.tokenizer == "auto":
    if not tc.init_from:
      return load_tokenizer("byte")
    try:
      return tokenizer_for_model(tc.init_from, vocab_size)
    except FileNotFoundError as e:
      raise ValueError(f"--init_from: {e}") from e
  return load_tokenizer(tc.tokenizer)


class ChatRows:
  """Packed conversations: row i is {"tokens", "loss_mask", "segment_ids"} [seq_len + 1]. `key`
  identifies the file and tokenizer (a resumed run compares it, as for text corpora)."""

  def __init__(self, rows: dict[str, np.ndarray], source: str, cut: str = "",
               key: str | None = None):
    self.key = key
    if not len(rows["tokens"]):
      raise ValueError(f"{source}: no rows")
    if not rows["loss_mask"][:, 1:].any():
      raise ValueError(f"{source}: no assistant tokens to train on{cut}")
    self.rows = rows

  def __len__(self) -> int:
    return len(self.rows["tokens"])

  def get(self, indices) -> dict[str, np.ndarray]:
    idx = np.asarray(indices, np.int64)
    return {k: v[idx].astype(np.int32) for k, v in self.rows.items()}


def chat_rows(path: str, tc: TrainConfig, tokenizer) -> ChatRows:
  """A JSONL file of conversations, tokenized with the chat template and packed."""
  template = chat.ChatTemplate(chat.read_template(tc.init_from), tokenizer)
  convs = chat.read_conversations(path, tc.data_format)
  pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
  encoded = [template.encode(m) for m in convs]
  longest = max((len(ids) for ids, _ in encoded), default=0)
  cut = sum(len(ids) > tc.seq_len + 1 for ids, _ in encoded)
  why = (f" ({cut} of {len(encoded)} conversations are longer than --seq_len + 1 = "
         f"{tc.seq_len + 1} tokens, the longest {longest}, and were cut; raise --seq_len)"
         if cut else "")
  return ChatRows(chat.pack(encoded, tc.seq_len + 1, pad), f"--data={path}", why,
                  key=data_lib.corpus_key([os.path.abspath(path)], tokenizer))


def make_dataset(tc: TrainConfig, tokenizer, workdir: str, *, path: str | None = None, log=None):
  """The training set (or another path in the same format, e.g. --eval_data)."""
  path = tc.data if path is None else path
  if tc.data_format == "text":
    return data_lib.make_dataset(path, tokenizer, tc.seq_len, os.path.join(workdir, "data"),
                                 patterns=tc.data_patterns, exclude=tc.data_exclude,
                                 max_bytes=tc.max_data_bytes, log=log)
  return chat_rows(path, tc, tokenizer)


def _as_rows(batch) -> dict[str, np.ndarray]:
  if isinstance(batch, dict):
    return batch
  return {"tokens": batch, "loss_mask": np.ones_like(batch)}


def eval_batches(dataset, batch_size: int):
  """The held-out set in order, in batches of `batch_size` rows (the last one filled up with
  copies of a row that has no targets)."""
  n = len(dataset)
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(start + batch_size, n))
    batch = _as_rows(dataset.get(idx))
    if len(idx) < batch_size:
      fill = _as_rows(dataset.get(np.zeros(batch_size - len(idx), np.int64)))
      fill["loss_mask"] = np.zeros_like(fill["loss_mask"])
      batch = {k: np.concatenate([batch[k], fill[k]]) for k in batch}
    yield batch
