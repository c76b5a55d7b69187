"""Training data: local text files, tokenized once into a memory-mapped token file, packed, shuffled.

Pipeline:
  1. `list_files(data)`: files and directories (searched recursively for `patterns`, default
     *.py, *.txt, *.md), in sorted order, optionally capped at `max_bytes` of text.
  2. `build_token_file(files, tokenizer, cache_dir)`: every document's ids followed by eos, as one
     flat uint16 (vocab <= 65536) or uint32 array in `<key>.bin` with a `<key>.json` meta file.
     The key hashes the file list (paths, sizes, mtimes), the tokenizer's fingerprint and the cap,
     so a changed corpus is re-tokenized and an unchanged one is read back. Both files appear
     atomically (temporary name, then os.replace; the meta last, as the commit marker).
  3. `PackedDataset(token_file, seq_len)`: sequence i is tokens[i*L : i*L + L + 1] (L = seq_len),
     i.e. consecutive windows overlapping by one token so each token is a target exactly once.
  4. `DataIterator(dataset, batch_size, seed)`: each epoch visits every sequence once in the order
     of a permutation drawn from numpy's PCG64 seeded with (seed, epoch); a batch may span an epoch
     boundary. Its position is the small dict {"epoch", "index"} (`state()` / `restore(state)`),
     saved with each checkpoint so a restarted run reads exactly the batches it would have read.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import logging
import os
from typing import Sequence

import numpy as np

from deepseek_jax.tokenizer import Tokenizer

log_ = logging.getLogger(__name__)

DEFAULT_PATTERNS = ("*.py", "*.txt", "*.md")
DEFAULT_EXCLUDE = ("__pycache__", ".*")  # directory names never entered
_META_VERSION = 1


def list_files(data: str | os.PathLike | Sequence[str | os.PathLike], *,
               patterns: Sequence[str] = DEFAULT_PATTERNS,
               exclude: Sequence[str] = DEFAULT_EXCLUDE,
               max_bytes: int | None = None) -> list[str]:
  """Absolute paths of the corpus files, sorted; `data` is one path, comma-separated paths or a list.

  A file named directly is taken whatever its extension; directories are walked recursively for
  files matching `patterns`, skipping subdirectories whose name matches `exclude`. With `max_bytes`, files are taken in order until their total size
  reaches the cap (at least one file). Raises FileNotFoundError naming a missing path and
  ValueError when nothing matches.
  """
  if isinstance(data, (str, os.PathLike)):
    paths = [p for p in os.fspath(data).split(",") if p]
  else:
    paths = [os.fspath(p) for p in data]
  if not paths:
    raise ValueError("--data is empty: expected a file or directory of text")
  found: list[str] = []
  for p in paths:
    if os.path.isfile(p):
      found.append(os.path.abspath(p))
    elif os.path.isdir(p):
      for root, dirs, names in os.walk(p):
        dirs[:] = sorted(d for d in dirs if not any(fnmatch.fnmatch(d, x) for x in exclude))
        for n in sorted(names):
          if any(fnmatch.fnmatch(n, pat) for pat in patterns):
            full = os.path.join(root, n)
            if os.path.isfile(full):
              found.append(os.path.abspath(full))
    else:
      raise FileNotFoundError(f"--data={p}: no such file or directory")
  found = sorted(dict.fromkeys(found))
  if not found:
    raise ValueError(f"--data={','.join(paths)}: empty corpus (no files matching "
                     f"{', '.join(patterns)})")
  if max_bytes is not None:
    kept, total = [], 0
    for f in found:
      if kept and total >= max_bytes:
        break
      kept.append(f)
      total += os.path.getsize(f)
    found = kept
  return found


def corpus_key(files: Sequence[str], tokenizer: Tokenizer) -> str:
  """A hash of the file list (paths, sizes, mtimes) and the tokenizer; names the cached token file."""
  h = hashlib.sha256()
  h.update(f"v{_META_VERSION}|{tokenizer.fingerprint}|".encode())
  for f in files:
    st = os.stat(f)
    h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
  return h.hexdigest()[:20]


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def build_token_file(files: Sequence[str], tokenizer: Tokenizer, cache_dir: str | os.PathLike, *,
                     log=None) -> str:
  """Tokenizes `files` (each followed by eos) into `cache_dir/<key>.bin`; returns the meta path.

  Reuses the cached file when the key matches. Undecodable bytes become U+FFFD, with a warning
  naming the files that are not valid UTF-8 (binary files named in --data, say).
  """
  cache_dir = os.fspath(cache_dir)
  os.makedirs(cache_dir, exist_ok=True)
  key = corpus_key(files, tokenizer)
  meta_path = os.path.join(cache_dir, f"tokens-{key}.json")
  bin_path = os.path.join(cache_dir, f"tokens-{key}.bin")
  if os.path.isfile(meta_path) and os.path.isfile(bin_path):
    return meta_path
  dtype = token_dtype(tokenizer.vocab_size)
  tmp_bin = f"{bin_path}.tmp{os.getpid()}"
  n_tokens = n_text = 0
  not_utf8: list[str] = []
  with open(tmp_bin, "wb") as out:
    for f in files:
      with open(f, "rb") as fh:
        raw = fh.read()
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError:
        not_utf8.append(f)
        text = raw.decode("utf-8", errors="replace")
      ids = tokenizer.encode(text)
      n_text += len(ids)
      if tokenizer.eos_id is not None:
        ids.append(tokenizer.eos_id)
      arr = np.asarray(ids, dtype=np.int64)
      if arr.size and (arr.min() < 0 or arr.max() >= np.iinfo(dtype).max + 1):
        raise ValueError(f"{f}: token id out of range for {dtype}")
      out.write(arr.astype(dtype).tobytes())
      n_tokens += arr.size
  if not_utf8:
    log_.warning("%d of %d files are not valid UTF-8 (first: %s); their undecodable bytes were "
                 "read as U+FFFD", len(not_utf8), len(files), not_utf8[0])
  if n_text == 0:
    os.remove(tmp_bin)
    raise ValueError(f"empty corpus: the {len(files)} file(s) starting with {files[0]} hold no text")
  os.replace(tmp_bin, bin_path)
  meta = {"version": _META_VERSION, "dtype": dtype.name, "num_tokens": n_tokens,
          "num_files": len(files), "tokenizer": tokenizer.fingerprint,
          "vocab_size": tokenizer.vocab_size, "bin": os.path.basename(bin_path),
          "not_utf8_files": len(not_utf8)}
  tmp_meta = f"{meta_path}.tmp{os.getpid()}"
  with open(tmp_meta, "w", encoding="utf-8") as fh:
    json.dump(meta, fh, indent=1)
  os.replace(tmp_meta, meta_path)
  if log:
    log(f"tokenized {len(files)} files into {n_tokens} tokens: {bin_path}")
  return meta_path


def load_tokens(meta_path: str | os.PathLike) -> np.ndarray:
  """The token file as a read-only memory map."""
  meta_path = os.fspath(meta_path)
  with open(meta_path, encoding="utf-8") as fh:
    meta = json.load(fh)
  bin_path = os.path.join(os.path.dirname(meta_path), meta["bin"])
  dtype = np.dtype(meta["dtype"])
  n = int(meta["num_tokens"])
  if os.path.getsize(bin_path) != n * dtype.itemsize:
    raise ValueError(f"{bin_path}: size does not match {meta_path} ({n} x {dtype}); delete both")
  if n == 0:
    return np.zeros((0,), dtype)
  return np.memmap(bin_path, dtype=dtype, mode="r", shape=(n,))


class PackedDataset:
  """Consecutive windows of seq_len + 1 tokens (inputs and shifted targets) over a token array.

  `key` identifies the corpus and tokenizer (`corpus_key`; None when unknown): a resumed run
  compares it with its checkpoint's."""

  def __init__(self, tokens: np.ndarray, seq_len: int, *, source: str = "corpus",
               key: str | None = None):
    if seq_len < 1:
      raise ValueError(f"--seq_len={seq_len}: must be >= 1")
    if tokens.size == 0:
      raise ValueError(f"{source}: empty corpus (no tokens)")
    if tokens.size < seq_len + 1:
      raise ValueError(f"--seq_len={seq_len} is larger than the corpus: {source} holds "
                       f"{tokens.size} tokens, a sequence needs seq_len + 1 = {seq_len + 1}")
    self.tokens = tokens
    self.seq_len = seq_len
    self.key = key
    self.num_sequences = (tokens.size - 1) // seq_len

  def __len__(self) -> int:
    return self.num_sequences

  def get(self, indices: np.ndarray) -> np.ndarray:
    """[len(indices), seq_len + 1] int32."""
    idx = np.asarray(indices, np.int64)[:, None] * self.seq_len + np.arange(self.seq_len + 1)
    return np.asarray(self.tokens[idx], dtype=np.int32)


@dataclasses.dataclass
class DataIterator:
  """Deterministic shuffled batches [batch_size, seq_len + 1]; position saved as {"epoch", "index"}."""

  dataset: PackedDataset
  batch_size: int
  seed: int
  epoch: int = 0
  index: int = 0  # sequences of the current epoch already consumed

  def __post_init__(self):
    if self.batch_size < 1:
      raise ValueError(f"--batch_size={self.batch_size}: must be >= 1")
    self._perm_epoch = -1
    self._perm = np.zeros((0,), np.int64)

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._perm_epoch:
      rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
      self._perm = rng.permutation(len(self.dataset))
      self._perm_epoch = epoch
    return self._perm

  def state(self) -> dict[str, int]:
    return {"epoch": int(self.epoch), "index": int(self.index)}

  def restore(self, state: dict) -> None:
    epoch, index = int(state["epoch"]), int(state["index"])
    if epoch < 0 or not 0 <= index <= len(self.dataset):
      raise ValueError(f"data position {state}: out of range for {len(self.dataset)} sequences")
    self.epoch, self.index = epoch, index

  def next_indices(self) -> np.ndarray:
    picked = []
    need = self.batch_size
    while need:
      if self.index >= len(self.dataset):
        self.epoch, self.index = self.epoch + 1, 0
      perm = self._permutation(self.epoch)
      take = perm[self.index:self.index + need]
      picked.append(take)
      self.index += take.size
      need -= take.size
    return np.concatenate(picked)

  def __next__(self) -> np.ndarray:
    return self.dataset.get(self.next_indices())

  def __iter__(self):
    return self


def make_dataset(data: str | Sequence[str], tokenizer: Tokenizer, seq_len: int, cache_dir: str, *,
                 patterns: Sequence[str] = DEFAULT_PATTERNS,
                 exclude: Sequence[str] = DEFAULT_EXCLUDE, max_bytes: int | None = None,
                 log=None) -> PackedDataset:
  """list_files + build_token_file + PackedDataset, with errors that name `data`."""
  files = list_files(data, patterns=patterns, exclude=exclude, max_bytes=max_bytes)
  meta = build_token_file(files, tokenizer, cache_dir, log=log)
  source = data if isinstance(data, str) else ",".join(map(str, data))
  return PackedDataset(load_tokens(meta), seq_len, source=f"--data={source}",
                       key=corpus_key(files, tokenizer))

