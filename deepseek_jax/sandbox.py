"""Run untrusted Python (a model's completion and its unit tests) in a separate, limited process.

Never in-process: `run_python` writes the code into a fresh temporary directory and starts a new
interpreter through a small trusted launcher (a separate process, so no `preexec_fn` runs in a
multi-threaded JAX parent). The launcher, before it `exec`s the sandboxed interpreter:
  1. leaves the network: a new, empty network namespace (`unshare(CLONE_NEWNET)`, or with a
     user namespace when unprivileged); where the kernel refuses both, the audit hook below still
     refuses every socket call;
  2. sets resource limits: address space (`memory_mb`), CPU seconds, the size of any file it
     writes, open files, no core dumps, and the number of processes: `RLIMIT_NPROC` (a fork
     bomb stops there) and, since the kernel does not enforce that limit for root, a `pids`
     cgroup with `pids.max` when running as root (where the cgroup file system is writable);
  3. runs in its own session (process group); on timeout the session and every process in the
     cgroup are killed.
Inside, a bootstrap installs an audit hook (PEP 578; it cannot be removed) that refuses writes
outside the temporary directory (open for writing, remove, rename, mkdir, chmod, ...), sockets
(connect, bind, sendto, getaddrinfo), new processes (fork, exec, spawn, subprocess, system) and
ctypes (which could go around the hook), then runs the code. The run passes only if the code
returns normally to the bootstrap, which then prints a per-run random nonce read from stdin
before the code started: `sys.exit(0)` or `os._exit(0)` early in a completion does not pass.
stdout and stderr go to files in the temporary directory (capped by the file-size limit).
The directory is removed afterwards.

What remains possible: reading files the user may read, and spending up to the time and memory
limits. This is a guard against runaway or careless code, not a security boundary against an
adversary who inspects the bootstrap's frames.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

CGROUP_PIDS = ("/sys/fs/cgroup/pids", "/sys/fs/cgroup")  # cgroup v1 pids hierarchy, v2 root

# unshare(2) for the launcher and the probe (os.unshare is Python 3.12+). Needs ctypes and os.
_UNSHARE = r"""
def unshare(flags):
  if hasattr(os, "unshare"):
    os.unshare(flags)
    return
  libc = ctypes.CDLL(None, use_errno=True)
  if libc.unshare(flags) != 0:
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
"""

# The launcher: trusted code in a fresh single-threaded process. argv: limits as JSON, the pids
# cgroup to join ("" for none), then the command to exec.
_LAUNCHER = r"""
import ctypes, json, os, resource, sys
lim = json.loads(sys.argv[1])
if sys.argv[2]:
  with open(os.path.join(sys.argv[2], "cgroup.procs"), "w") as f:
    f.write(str(os.getpid()))
""" + _UNSHARE + r"""
for flags in (0x40000000, 0x40000000 | 0x10000000):  # netns; userns + netns (unprivileged)
  try:
    unshare(flags)
    break
  except OSError:
    pass
mb = lim["memory_mb"] << 20
for res, val in ((resource.RLIMIT_AS, mb), (resource.RLIMIT_CPU, lim["cpu_s"]),
                 (resource.RLIMIT_FSIZE, lim["file_bytes"]), (resource.RLIMIT_NOFILE, 64),
                 (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, lim["processes"])):
  resource.setrlimit(res, (val, val))
os.execv(sys.argv[3], sys.argv[3:])
"""

# The bootstrap: runs in the sandboxed interpreter. argv: the directory, the file to run.
_BOOTSTRAP = r"""
import os, sys
_root = os.path.realpath(sys.argv[1])
_main = sys.argv[2]
_nonce = sys.stdin.readline().strip()
sys.stdin.close()
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_PATH_EVENTS = {"os.remove": 1, "os.rename": 2, "os.replace": 2, "os.mkdir": 1, "os.rmdir": 1,
                "os.chmod": 1, "os.chown": 1, "os.link": 2, "os.symlink": 2, "os.truncate": 1,
                "os.utime": 1, "shutil.rmtree": 1, "shutil.move": 2, "shutil.copyfile": 2,
                "os.chdir": 1}
_DENY = ("socket.", "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
         "subprocess.Popen", "ctypes.", "os.startfile", "pty.spawn", "os.kill", "os.killpg")
def _inside(p):
  if isinstance(p, int):
    return True
  p = os.fsdecode(p)
  full = os.path.realpath(p if os.path.isabs(p) else os.path.join(os.getcwd(), p))
  return full == _root or full.startswith(_root + os.sep)
def _hook(event, args):
  if event == "open":
    path, mode, flags = (tuple(args) + (None, None))[:3]
    writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
        isinstance(flags, int) and flags & _WRITE)
    if writing and path is not None and not _inside(path):
      raise PermissionError(f"sandbox: writing outside its directory is refused: {path}")
  elif event in _PATH_EVENTS:
    for p in args[:_PATH_EVENTS[event]]:
      if p is not None and not _inside(p):
        raise PermissionError(f"sandbox: {event} outside its directory is refused: {p}")
  elif event.startswith(_DENY) and event != "socket.__new__":
    raise PermissionError(f"sandbox: {event} is refused (no network, no new processes)")
sys.addaudithook(_hook)
del _hook
with open(_main, encoding="utf-8") as f:
  _code = compile(f.read(), _main, "exec")
exec(_code, {"__name__": "__main__", "__file__": _main})
sys.stdout.flush()
print("\n" + _nonce, flush=True)
"""


@dataclasses.dataclass(frozen=True)
class Limits:
  """What one run may use."""
  timeout_s: float = 5.0     # wall clock, then the whole process group is killed
  cpu_s: int = 5             # RLIMIT_CPU
  memory_mb: int = 1024      # RLIMIT_AS (address space)
  processes: int = 16        # RLIMIT_NPROC (of the sandbox's user)
  file_bytes: int = 1 << 20  # RLIMIT_FSIZE: any file it writes, stdout and stderr included


@dataclasses.dataclass(frozen=True)
class Result:
  passed: bool         # returned normally (exit 0 and the nonce printed after the code)
  returncode: int | None
  timed_out: bool
  stdout: str
  stderr: str
  network: str         # how the network was cut: "netns", "userns+netns" or "none" (hook only)
  processes: str       # how processes were capped: "cgroup", "rlimit" or "none" (hook only)
  seconds: float


def _read(path: str, limit: int = 1 << 16) -> str:
  try:
    with open(path, "rb") as f:
      return f.read(limit).decode("utf-8", errors="replace")
  except OSError:
    return ""


def _make_cgroup(max_pids: int) -> str | None:
  """A fresh pids cgroup limited to `max_pids` (as root, where writable), else None."""
  if os.geteuid() != 0:
    return None
  for base in CGROUP_PIDS:
    if not os.path.isfile(os.path.join(base, "cgroup.procs")):
      continue
    if base == CGROUP_PIDS[1] and "pids" not in _read(os.path.join(base, "cgroup.subtree_control")):
      continue
    path = os.path.join(base, f"deepseek_sandbox_{os.getpid()}_{secrets.token_hex(4)}")
    try:
      os.mkdir(path)
      with open(os.path.join(path, "pids.max"), "w") as f:
        f.write(str(max_pids))
      return path
    except OSError:
      try:
        os.rmdir(path)
      except OSError:
        pass
  return None


def _remove_cgroup(path: str) -> None:
  """Kills every process left in the cgroup, then removes it."""
  for _ in range(100):
    pids = [int(p) for p in _read(os.path.join(path, "cgroup.procs")).split()]
    if not pids:
      break
    for pid in pids:
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
    time.sleep(0.01)
  for _ in range(100):
    try:
      os.rmdir(path)
      return
    except OSError:
      time.sleep(0.01)


def run_python(code: str, *, limits: Limits = Limits(), files: dict[str, str] | None = None
               ) -> Result:
  """Runs `code` (the whole program: a completion followed by its tests) in the sandbox described
  in the module docstring; `files` are extra files written beside it first. Never raises for
  anything the code does."""
  root = tempfile.mkdtemp(prefix="deepseek_sandbox_")
  start = time.perf_counter()
  proc = None
  cgroup = None
  timed_out = False
  try:
    main = os.path.join(root, "main.py")
    for name, text in {"main.py": code, **(files or {})}.items():
      path = os.path.join(root, name)
      if os.path.dirname(os.path.realpath(path)) != os.path.realpath(root):
        raise ValueError(f"sandbox files: {name!r} is not a plain file name")
      with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    cgroup = _make_cgroup(limits.processes)
    nonce = secrets.token_hex(16)
    lim = {"memory_mb": int(limits.memory_mb), "cpu_s": int(limits.cpu_s),
           "file_bytes": int(limits.file_bytes), "processes": int(limits.processes)}
    out_path, err_path = os.path.join(root, ".stdout"), os.path.join(root, ".stderr")
    env = {"PATH": "/usr/bin:/bin", "HOME": root, "TMPDIR": root, "PYTHONIOENCODING": "utf-8",
           "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
      proc = subprocess.Popen(
          [sys.executable, "-I", "-c", _LAUNCHER, json.dumps(lim), cgroup or "",
           sys.executable, "-I", "-B", "-c", _BOOTSTRAP, root, main],
          stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=root, env=env,
          start_new_session=True, close_fds=True)
      try:
        proc.stdin.write((nonce + "\n").encode())
        proc.stdin.close()
      except OSError:
        pass  # it already died
      try:
        proc.wait(timeout=limits.timeout_s)
      except subprocess.TimeoutExpired:
        timed_out = True
    if proc.poll() is None or timed_out:
      timed_out = True
    stdout, stderr = _read(out_path), _read(err_path)
    lines = stdout.rstrip("\n").split("\n")
    passed = (not timed_out and proc.returncode == 0 and lines[-1] == nonce)
    if passed:
      stdout = "\n".join(lines[:-1]).rstrip("\n")
    processes = "cgroup" if cgroup else ("rlimit" if os.geteuid() else "none")
    return Result(passed, proc.returncode, timed_out, stdout, stderr, _network_mode(), processes,
                  time.perf_counter() - start)
  finally:
    if proc is not None:
      try:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole session: children included
      except (ProcessLookupError, PermissionError):
        pass
      proc.wait()
    if cgroup is not None:
      _remove_cgroup(cgroup)
    shutil.rmtree(root, ignore_errors=True)


_NET_MODE: str | None = None


def _network_mode() -> str:
  """How the launcher cuts the network on this machine (probed once, in a child)."""
  global _NET_MODE
  if _NET_MODE is None:
    probe = subprocess.run([sys.executable, "-I", "-c", _PROBE], capture_output=True, text=True,
                           timeout=30)
    _NET_MODE = probe.stdout.strip() or "none"
  return _NET_MODE


_PROBE = r"""
import ctypes, os
""" + _UNSHARE + r"""
for flags, name in ((0x40000000, "netns"), (0x40000000 | 0x10000000, "userns+netns")):
  try:
    unshare(flags)
    print(name)
    break
  except OSError:
    pass
else:
  print("none")
"""
