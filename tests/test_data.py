"""Data pipeline: file listing, cached token file, packing, deterministic shuffling, exact resume."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

from deepseek_jax import data
from deepseek_jax.tokenizer import ByteTokenizer


@pytest.fixture
def corpus(tmp_path):
  root = tmp_path / "corpus"
  (root / "pkg" / "sub").mkdir(parents=True)
  (root / "a.py").write_text("def a():\n  return 1\n" * 5)
  (root / "pkg" / "b.md").write_text("# title\nsome text\n" * 5)
  (root / "pkg" / "sub" / "c.txt").write_text("plain text é\n" * 5)
  (root / "pkg" / "skip.bin").write_bytes(b"\x00\x01")
  return root


def test_list_files_recursive_sorted_and_capped(corpus):
  files = data.list_files(str(corpus))
  assert [os.path.relpath(f, corpus) for f in files] == ["a.py", "pkg/b.md", "pkg/sub/c.txt"]
  assert data.list_files(str(corpus), patterns=("*.py",)) == [str(corpus / "a.py")]
  # an explicit file is taken whatever its extension; comma-separated paths are joined
  both = data.list_files(f"{corpus / 'pkg' / 'skip.bin'},{corpus / 'a.py'}")
  assert len(both) == 2
  assert len(data.list_files(str(corpus), max_bytes=1)) == 1
  assert [os.path.relpath(f, corpus) for f in data.list_files(str(corpus), exclude=("sub",))] == [
      "a.py", "pkg/b.md"]
  (corpus / "__pycache__").mkdir()
  (corpus / "__pycache__" / "x.py").write_text("cached")
  assert len(data.list_files(str(corpus))) == 3  # __pycache__ is skipped by default


def test_token_file_contents_and_cache(corpus, tmp_path):
  tok = ByteTokenizer()
  files = data.list_files(str(corpus))
  meta = data.build_token_file(files, tok, tmp_path / "cache")
  tokens = data.load_tokens(meta)
  assert tokens.dtype == np.uint16 and isinstance(tokens, np.memmap)
  expected = []
  for f in files:
    expected += list(open(f, "rb").read()) + [tok.eos_id]
  np.testing.assert_array_equal(np.asarray(tokens), expected)
  mtime = os.stat(meta).st_mtime_ns
  assert data.build_token_file(files, tok, tmp_path / "cache") == meta  # cached
  assert os.stat(meta).st_mtime_ns == mtime
  # touching a file changes the key
  (corpus / "a.py").write_text("changed\n")
  assert data.build_token_file(data.list_files(str(corpus)), tok, tmp_path / "cache") != meta
  assert not [n for n in os.listdir(tmp_path / "cache") if ".tmp" in n]


def test_packing_windows_overlap_by_one(corpus, tmp_path):
  ds = data.make_dataset(str(corpus), ByteTokenizer(), 16, str(tmp_path / "cache"))
  tokens = np.asarray(ds.tokens)
  assert len(ds) == (tokens.size - 1) // 16
  seqs = ds.get(np.arange(len(ds)))
  assert seqs.shape == (len(ds), 17) and seqs.dtype == np.int32
  np.testing.assert_array_equal(seqs[1:, 0], seqs[:-1, -1])
  np.testing.assert_array_equal(seqs[:, :-1].reshape(-1), tokens[:len(ds) * 16])


def test_iterator_epochs_are_permutations_and_seeded(corpus, tmp_path):
  ds = data.make_dataset(str(corpus), ByteTokenizer(), 8, str(tmp_path / "cache"))
  n = len(ds)
  it = data.DataIterator(ds, batch_size=3, seed=7)
  idx = np.concatenate([it.next_indices() for _ in range(-(-2 * n // 3))])[:2 * n]
  assert sorted(idx[:n]) == list(range(n)) and sorted(idx[n:]) == list(range(n))
  assert not np.array_equal(idx[:n], idx[n:])  # a new order each epoch
  other = data.DataIterator(ds, batch_size=3, seed=8)
  assert not np.array_equal(other.next_indices(), idx[:3])


def test_iterator_resume_is_exact(corpus, tmp_path):
  ds = data.make_dataset(str(corpus), ByteTokenizer(), 8, str(tmp_path / "cache"))
  full = data.DataIterator(ds, batch_size=5, seed=3)
  batches = [next(full) for _ in range(12)]  # crosses epoch boundaries
  first = data.DataIterator(ds, batch_size=5, seed=3)
  for _ in range(7):
    next(first)
  saved = first.state()
  assert set(saved) == {"epoch", "index"}
  resumed = data.DataIterator(ds, batch_size=5, seed=3)
  resumed.restore(saved)
  for b in batches[7:]:
    np.testing.assert_array_equal(next(resumed), b)


def test_batch_larger_than_dataset(corpus, tmp_path):
  ds = data.make_dataset(str(corpus), ByteTokenizer(), 64, str(tmp_path / "cache"))
  it = data.DataIterator(ds, batch_size=len(ds) * 2 + 1, seed=0)
  assert next(it).shape == (len(ds) * 2 + 1, 65)


def test_errors(corpus, tmp_path):
  tok = ByteTokenizer()
  with pytest.raises(FileNotFoundError, match="--data=.*nope: no such file"):
    data.list_files(str(tmp_path / "nope"))
  (tmp_path / "empty_dir").mkdir()
  with pytest.raises(ValueError, match="empty corpus"):
    data.list_files(str(tmp_path / "empty_dir"))
  (tmp_path / "empty_dir" / "e.py").write_text("")
  with pytest.raises(ValueError, match="empty corpus"):
    data.make_dataset(str(tmp_path / "empty_dir"), tok, 8, str(tmp_path / "cache"))
  with pytest.raises(ValueError, match="seq_len=100000 is larger than the corpus"):
    data.make_dataset(str(corpus), tok, 100000, str(tmp_path / "cache"))
  ds = data.make_dataset(str(corpus), tok, 8, str(tmp_path / "cache"))
  with pytest.raises(ValueError, match="out of range"):
    data.DataIterator(ds, 2, 0).restore({"epoch": 0, "index": len(ds) + 1})


def test_files_that_are_not_utf8_are_named_in_a_warning(tmp_path, caplog):
  """Before: random binary files were trained on as U+FFFD characters without a word."""
  (tmp_path / "a.txt").write_text("plain text")
  (tmp_path / "b.txt").write_bytes(bytes(range(256)) * 4)
  with caplog.at_level(logging.WARNING):
    meta = data.build_token_file(data.list_files(str(tmp_path)), ByteTokenizer(), tmp_path / "c")
  said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(said) == 1 and "1 of 2 files are not valid UTF-8" in said[0], said
  assert str(tmp_path / "b.txt") in said[0]
  assert json.loads(open(meta).read())["not_utf8_files"] == 1
