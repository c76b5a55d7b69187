"""Outputs that appear whole or not at all, and never at the expense of an input.

A directory is written under a temporary sibling `.NAME.tmp-<pid>@<host>-<random>` and renamed
into place when complete (an old NAME is first renamed to `.NAME.old-<pid>@<host>-<random>`, then
removed); on error the temporary is removed. A process killed outright (SIGKILL, power loss)
cannot remove its temporary: the next run writing NAME removes the temporaries of NAME whose
process is gone (same host, pid no longer running; or of the older `.NAME.tmp-<random>` naming),
logging each with its size. Temporaries of a live process are left alone.

`check_apart` refuses an output that is, contains or lies inside one of the inputs (replacing it
would delete the input: `--overwrite` onto the source checkpoint once did). Outputs get the
user's umask (a bare `tempfile.mkdtemp` would leave them 0700).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from typing import Mapping

log = logging.getLogger(__name__)


def _within(path: str, root: str) -> bool:
  return os.path.commonpath([path, root]) == root


def check_apart(output_dir: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None], *,
                output_name: str = "output_dir") -> None:
  """ValueError when `output_dir` is, contains or lies inside an input ({name: path}; None
  entries are skipped), naming both; symlinks are resolved first."""
  out = os.path.realpath(os.fspath(output_dir))
  for name, path in inputs.items():
    if path is None:
      continue
    inp = os.path.realpath(os.fspath(path))
    if out == inp:
      how = "is"
    elif _within(out, inp):
      how = "lies inside"
    elif _within(inp, out):
      how = "contains"
    else:
      continue
    raise ValueError(f"{output_name}={output_dir} {how} the input {name}={path}: writing there "
                     "could replace or delete the input; choose an output directory apart from it")


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _tag() -> str:
  return f"{os.getpid()}@{socket.gethostname()}-"


def _owner_gone(suffix: str) -> bool:
  """Whether the process that named a temporary `<pid>@<host>-<random>` (or a legacy
  `<random>`) is gone; a process on another host is presumed alive."""
  pid, at, rest = suffix.partition("@")
  if not at:
    return True  # the naming before pids were recorded
  if not pid.isdigit() or rest.rsplit("-", 1)[0] != socket.gethostname():
    return False
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return True
  except PermissionError:  # alive, another user's
    return False
  return False


def _size(path: str) -> int:
  total = 0
  for root, _, files in os.walk(path):
    for f in files:
      try:
        total += os.lstat(os.path.join(root, f)).st_size
      except OSError:
        pass
  return total


def remove_stale_temporaries(output_dir: str | os.PathLike) -> list[str]:
  """Removes `.NAME.tmp-*` / `.NAME.old-*` siblings of `output_dir` left by dead processes (see
  the module docstring); returns their paths."""
  output_dir = os.path.abspath(os.fspath(output_dir))
  parent, base = os.path.split(output_dir)
  if not os.path.isdir(parent):
    return []
  removed = []
  for name in sorted(os.listdir(parent)):
    for kind in (".tmp-", ".old-"):
      prefix = f".{base}{kind}"
      path = os.path.join(parent, name)
      if name.startswith(prefix) and os.path.isdir(path) and not os.path.islink(path):
        if _owner_gone(name[len(prefix):]):
          size = _size(path)
          shutil.rmtree(path, ignore_errors=True)
          log.warning("removed %s (%.1f MB) left by an interrupted run writing %s", path,
                      size / 1e6, output_dir)
          removed.append(path)
  return removed


def prepare_output(output_dir: str, overwrite: bool) -> str:
  """Refuses a non-empty `output_dir` unless `overwrite`; removes stale temporaries of earlier
  runs; returns a fresh temporary sibling (with the user's umask)."""
  output_dir = os.path.abspath(output_dir)
  if os.path.exists(output_dir):
    if not os.path.isdir(output_dir):
      raise FileExistsError(f"{output_dir}: exists and is not a directory")
    if os.listdir(output_dir) and not overwrite:
      raise FileExistsError(f"{output_dir}: exists and is not empty (pass overwrite / --overwrite)")
  parent = os.path.dirname(output_dir)
  os.makedirs(parent, exist_ok=True)
  remove_stale_temporaries(output_dir)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.tmp-{_tag()}", dir=parent)
  os.chmod(tmp, 0o777 & ~_umask())
  return tmp


def commit_output(tmp: str, output_dir: str) -> None:
  """Moves the finished temporary directory to `output_dir` (replacing an old one)."""
  output_dir = os.path.abspath(output_dir)
  old = None
  if os.path.exists(output_dir):
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.old-{_tag()}",
                           dir=os.path.dirname(output_dir))
    os.rmdir(old)
    os.rename(output_dir, old)
  os.rename(tmp, output_dir)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
