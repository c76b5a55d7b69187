"""Virtual environments for the peer benchmarks (MaxText, EasyDeL), created as a new user would.

Each peer gets its own venv under bench/.peers/<name> (git-ignored), made from a pinned interpreter
and a pinned `pip install` line; nothing is shared with our .venv. Creation is idempotent: a venv
whose stamp file records the same spec is reused, anything else is rebuilt from scratch. Every
install writes its full pip log to bench/.peers/<name>.install.log, and a failure is returned (and
written to bench/.peers/<name>.failed.json) with the reason pip gave, so the benchmark can print it.

  python bench/peers/envs.py [maxtext easydel]
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS_DIR = os.path.join(os.path.dirname(HERE), ".peers")


@dataclasses.dataclass(frozen=True)
class EnvSpec:
  """How one peer's venv is made."""
  name: str
  python: str            # "3.12": major.minor of the interpreter the peer requires
  packages: tuple[str, ...]  # the pip install line, versions pinned
  why: str               # why this interpreter / these extras (shown in RESULTS.md)


SPECS = {
    # MaxText 0.2.5 declares Requires-Python >= 3.12; plain `maxtext` installs no dependencies,
    # the `[tpu]` extra is the documented install and pulls jax, flax, optax, orbax, grain, ...
    "maxtext": EnvSpec("maxtext", "3.12", ("maxtext[tpu]==0.2.5",),
                       "MaxText 0.2.5 requires Python >= 3.12; the [tpu] extra carries its "
                       "dependencies (plain `maxtext` installs none)"),
    # EasyDeL 0.3.0 imports pillow and torch at import time without declaring them. The only
    # torch on this machine's disk is 2.13.0+cpu for CPython 3.11 (any other build is a multi-GB
    # CUDA download), so this venv uses Python 3.11.
    "easydel": EnvSpec("easydel", "3.11", ("easydel==0.3.0", "pillow", "torch==2.13.0"),
                       "EasyDeL 0.3.0 imports pillow and torch without declaring them; the only "
                       "torch wheel on disk is 2.13.0+cpu for CPython 3.11"),
}


def find_python(version: str) -> str | None:
  """An interpreter of exactly `version` (major.minor): PATH first, then pyenv's versions."""
  exe = shutil.which(f"python{version}")
  cands = ([exe] if exe else []) + sorted(
      glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python{version}")),
      reverse=True)
  for c in cands:
    try:
      out = subprocess.run([c, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                           capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
      continue
    if out == version:
      return c
  return None


def env_python(name: str) -> str:
  return os.path.join(PEERS_DIR, name, "bin", "python")


def _stamp_path(name: str) -> str:
  return os.path.join(PEERS_DIR, name, ".deepseek_jax_stamp.json")


def _failure_reason(log_path: str) -> str:
  """The lines of a pip log that say why it failed (ERROR lines, else its tail)."""
  try:
    with open(log_path, errors="replace") as f:
      lines = [l.rstrip() for l in f]
  except OSError:
    return "no log"
  errs = [l for l in lines if l.startswith("ERROR") or "error:" in l.lower()]
  return "\n".join(l[:300] for l in (errs or lines)[-12:])


def ensure_env(name: str, *, timeout_s: float = 600) -> dict:
  """Creates (or reuses) the venv of peer `name`.

  Returns {"name", "ok", "python", "reused", "install_s", "log", "spec", "error"?}: `ok` False
  carries `error`, the reason in pip's or the interpreter finder's words.
  """
  spec = SPECS[name]
  os.makedirs(PEERS_DIR, exist_ok=True)
  root = os.path.join(PEERS_DIR, name)
  log = os.path.join(PEERS_DIR, f"{name}.install.log")
  failed = os.path.join(PEERS_DIR, f"{name}.failed.json")
  want = json.loads(json.dumps(dataclasses.asdict(spec)))  # as the stamp reads back (lists)
  out = {"name": name, "python": None, "reused": False, "install_s": 0.0, "log": log,
         "spec": " ".join(spec.packages)}
  if os.path.exists(_stamp_path(name)) and os.path.exists(env_python(name)):
    with open(_stamp_path(name)) as f:
      stamp = json.load(f)
    if stamp.get("spec") == want:
      return dict(out, ok=True, reused=True, python=env_python(name),
                  install_s=stamp.get("install_s", 0.0))
  base = find_python(spec.python)
  if base is None:
    out.update(ok=False, error=f"no Python {spec.python} interpreter found (PATH or "
                               f"~/.pyenv/versions): {spec.why}")
    _write_json(failed, out)
    return out
  shutil.rmtree(root, ignore_errors=True)
  t0 = time.time()
  with open(log, "w") as f:
    f.write(f"# {base} -m venv {root}\n# pip install {' '.join(spec.packages)}\n")
    f.flush()
    cmds = [[base, "-m", "venv", root],
            [env_python(name), "-m", "pip", "install", "--upgrade", "pip"],
            [env_python(name), "-m", "pip", "install", *spec.packages]]
    for cmd in cmds:
      f.write(f"$ {' '.join(cmd)}\n")
      f.flush()
      left = timeout_s - (time.time() - t0)
      try:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=max(left, 1)).returncode
      except subprocess.TimeoutExpired:
        rc, why = -1, f"timed out after {timeout_s:.0f} s"
      else:
        why = None
      if rc != 0:
        f.flush()
        out.update(ok=False, install_s=time.time() - t0,
                   error=why or f"`{' '.join(cmd[2:])}` exited {rc}: {_failure_reason(log)}")
        _write_json(failed, out)
        return out
  took = time.time() - t0
  _write_json(_stamp_path(name), {"spec": want, "install_s": took, "base_python": base})
  if os.path.exists(failed):
    os.remove(failed)
  return dict(out, ok=True, python=env_python(name), install_s=took)


def _write_json(path: str, obj: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


if __name__ == "__main__":
  for n in sys.argv[1:] or list(SPECS):
    print(json.dumps(ensure_env(n)), flush=True)
