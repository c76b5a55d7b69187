"""Tokenizers for training and generation: a built-in byte tokenizer and a `tokenizer.json` wrapper.

Both expose the same small interface (`Tokenizer`): `encode(text) -> list[int]`,
`decode(ids) -> str`, `bos_id`, `eos_id`, `pad_id`, `vocab_size`, and a `fingerprint` string that
changes whenever the mapping from text to ids may change (the data cache is keyed on it).

Byte tokenizer ids (chosen so that every tiny preset, whose vocab_size is 512, can hold them):
  0..255  the UTF-8 bytes themselves
  256     bos (begin of sequence), written "<｜begin▁of▁sentence｜>" in text (as DeepSeek's is)
  257     eos (end of sequence; appended after each document by the data pipeline), written
          "<｜end▁of▁sentence｜>"
  258     pad
  vocab_size = 259 (a model's embedding may be larger; the extra rows are simply never used).
Both tokenizers give their special tokens as text too (`bos_token`, `eos_token`), for chat
templates.

A model directory carries its tokenizer: the release's files (`TOKENIZER_FILES`: tokenizer.json,
tokenizer_config.json with the chat template, ...) or, for the byte tokenizer, the small marker
`byte_tokenizer.json`. The converters copy them through and the trainer writes its own into the
workdir (`save_tokenizer`), so `tokenizer_for_model` finds the right one; a model whose vocabulary
is larger than the byte tokenizer's and that carries no tokenizer is refused, never decoded as
bytes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Protocol, Sequence

BYTE_TOKENIZER_FILE = "byte_tokenizer.json"
# Files of a tokenizer that travel with a model (present ones only): Hugging Face's and our marker.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "tokenizer.model",
                   BYTE_TOKENIZER_FILE)


class Tokenizer(Protocol):
  """What training and generation need from a tokenizer."""

  bos_id: int | None
  eos_id: int | None
  pad_id: int | None
  bos_token: str | None
  eos_token: str | None
  vocab_size: int
  fingerprint: str

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255, plus bos=256, eos=257, pad=258 (vocab_size 259)."""

  bos_id = 256
  eos_id = 257
  pad_id = 258
  bos_token = "<｜begin▁of▁sentence｜>"
  eos_token = "<｜end▁of▁sentence｜>"
  vocab_size = 259
  fingerprint = "byte-v2"
  _SPECIAL = re.compile(f"({re.escape(bos_token)}|{re.escape(eos_token)})")

  def encode(self, text: str) -> list[int]:
    """UTF-8 bytes; the bos and eos strings become their ids."""
    ids: list[int] = []
    for part in self._SPECIAL.split(text):
      if part == self.bos_token:
        ids.append(self.bos_id)
      elif part == self.eos_token:
        ids.append(self.eos_id)
      else:
        ids += part.encode("utf-8")
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    """Drops special ids; invalid UTF-8 (a cut multi-byte character) becomes U+FFFD."""
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return "ByteTokenizer()"


# Names of special tokens tried, in order, when no tokenizer_config.json names bos/eos.
_BOS_CANDIDATES = ("<｜begin▁of▁sentence｜>", "<s>", "<|begin_of_text|>", "<bos>", "[BOS]")
_EOS_CANDIDATES = ("<｜end▁of▁sentence｜>", "</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>",
                   "[EOS]")
_PAD_CANDIDATES = ("<｜▁pad▁｜>", "<pad>", "[PAD]", "<|pad|>")


class HFTokenizer:
  """A Hugging Face `tokenizer.json` (read with the `tokenizers` library).

  bos/eos/pad come from a `tokenizer_config.json` beside the file when there is one (its
  `bos_token` / `eos_token` / `pad_token`, a string or {"content": ...}), else from well-known
  special-token names; an id is None when the tokenizer has no such token.
  """

  def __init__(self, path: str | os.PathLike):
    import tokenizers  # imported lazily: only this class needs it

    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: tokenizer.json not found")
    try:
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the library raises a bare Exception on malformed files
      raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from e
    self.path = path
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    named = _read_special_names(os.path.join(os.path.dirname(path), "tokenizer_config.json"))
    self.bos_id = self._find(named.get("bos_token"), _BOS_CANDIDATES)
    self.eos_id = self._find(named.get("eos_token"), _EOS_CANDIDATES)
    self.pad_id = self._find(named.get("pad_token"), _PAD_CANDIDATES)
    self.bos_token = None if self.bos_id is None else self._tok.id_to_token(self.bos_id)
    self.eos_token = None if self.eos_id is None else self._tok.id_to_token(self.eos_id)
    st = os.stat(path)
    self.fingerprint = f"hf:{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"

  def _find(self, name: str | None, candidates: Sequence[str]) -> int | None:
    for n in ([name] if name else []) + list(candidates):
      i = self._tok.token_to_id(n)
      if i is not None:
        return int(i)
    return None

  def encode(self, text: str) -> list[int]:
    """Ids of `text` without added special tokens (the data pipeline adds eos between documents)."""
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def __repr__(self) -> str:
    return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def _read_special_names(config_path: str) -> dict[str, str]:
  if not os.path.isfile(config_path):
    return {}
  try:
    with open(config_path, encoding="utf-8") as f:
      raw = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{config_path}: not valid JSON ({e})") from e
  out = {}
  for key in ("bos_token", "eos_token", "pad_token"):
    v = raw.get(key) if isinstance(raw, dict) else None
    if isinstance(v, dict):
      v = v.get("content")
    if isinstance(v, str):
      out[key] = v
  return out


def load_tokenizer(path_or_name: str | os.PathLike) -> ByteTokenizer | HFTokenizer:
  """'byte' for the built-in byte tokenizer, or a `tokenizer.json` path, or a directory holding one."""
  name = os.fspath(path_or_name)
  if name == "byte":
    return ByteTokenizer()
  if os.path.isdir(name):
    candidate = os.path.join(name, "tokenizer.json")
    if not os.path.isfile(candidate):
      raise FileNotFoundError(f"--tokenizer={name}: directory has no tokenizer.json")
    return HFTokenizer(candidate)
  if os.path.isfile(name):
    return HFTokenizer(name)
  raise FileNotFoundError(
      f"--tokenizer={name!r}: expected 'byte', a tokenizer.json file or a directory holding one")


def tokenizer_files(directory: str | os.PathLike) -> dict[str, str]:
  """{file name: path} of the `TOKENIZER_FILES` present in `directory`."""
  d = os.fspath(directory)
  return {n: os.path.join(d, n) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(d, n))}


def save_tokenizer(tokenizer: ByteTokenizer | HFTokenizer, directory: str | os.PathLike) -> None:
  """Records `tokenizer` in a model directory: the byte marker, or the files beside a
  tokenizer.json (copied)."""
  d = os.fspath(directory)
  os.makedirs(d, exist_ok=True)
  if isinstance(tokenizer, ByteTokenizer):
    tmp = os.path.join(d, f".{BYTE_TOKENIZER_FILE}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump({"tokenizer": "deepseek_jax.tokenizer.ByteTokenizer",
                 "fingerprint": tokenizer.fingerprint}, f)
    os.replace(tmp, os.path.join(d, BYTE_TOKENIZER_FILE))
    return
  for name, path in tokenizer_files(os.path.dirname(tokenizer.path)).items():
    if name != BYTE_TOKENIZER_FILE and os.path.realpath(path) != os.path.realpath(
        os.path.join(d, name)):
      shutil.copyfile(path, os.path.join(d, name))


def tokenizer_for_model(model_dir: str | os.PathLike, vocab_size: int | None = None
                        ) -> ByteTokenizer | HFTokenizer:
  """The tokenizer a model directory carries: its tokenizer.json, or the byte tokenizer when it
  holds the byte marker or when the model's `vocab_size` fits the byte tokenizer's 259 ids.

  Raises FileNotFoundError otherwise: decoding a real vocabulary as bytes prints nonsense."""
  d = os.fspath(model_dir)
  if os.path.isfile(os.path.join(d, "tokenizer.json")):
    return load_tokenizer(d)
  if os.path.isfile(os.path.join(d, BYTE_TOKENIZER_FILE)) or (
      vocab_size is not None and vocab_size <= ByteTokenizer.vocab_size):
    return ByteTokenizer()
  size = "its size is unknown" if vocab_size is None else f"it has {vocab_size} ids"
  raise FileNotFoundError(
      f"{d}: no tokenizer.json (nor {BYTE_TOKENIZER_FILE}) there, and the model's vocabulary is "
      f"not the byte tokenizer's ({size}, more than {ByteTokenizer.vocab_size}): copy the "
      "release's tokenizer files (tokenizer.json, tokenizer_config.json) into it, or name a "
      "tokenizer (generate_text --tokenizer=PATH, or --tokenizer=byte)")
