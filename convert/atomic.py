"""Outputs that appear whole or not at all: a directory is written under a temporary sibling
name and renamed into place when complete; on error the temporary is removed."""

from __future__ import annotations

import os
import shutil
import tempfile


def prepare_output(output_dir: str, overwrite: bool) -> str:
  """Refuses a non-empty `output_dir` unless `overwrite`; returns a fresh temporary sibling."""
  output_dir = os.path.abspath(output_dir)
  if os.path.exists(output_dir):
    if not os.path.isdir(output_dir):
      raise FileExistsError(f"{output_dir}: exists and is not a directory")
    if os.listdir(output_dir) and not overwrite:
      raise FileExistsError(f"{output_dir}: exists and is not empty (pass overwrite / --overwrite)")
  parent = os.path.dirname(output_dir)
  os.makedirs(parent, exist_ok=True)
  return tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.tmp-", dir=parent)


def commit_output(tmp: str, output_dir: str) -> None:
  """Moves the finished temporary directory to `output_dir` (replacing an old one)."""
  output_dir = os.path.abspath(output_dir)
  old = None
  if os.path.exists(output_dir):
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.old-",
                           dir=os.path.dirname(output_dir))
    os.rmdir(old)
    os.rename(output_dir, old)
  os.rename(tmp, output_dir)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
