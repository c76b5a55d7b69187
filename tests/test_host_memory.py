"""The training CLI's huge pages (`deepseek_jax.host_memory`): when a command line runs again, with
what environment, and that it cuts the page faults of large XLA:CPU buffers."""

import os
import platform
import subprocess
import sys

import pytest

from deepseek_jax import host_memory

GLIBC = ("glibc", "2.36")

# A command line through `cli.run(main, huge_pages=True)`: prints each start of the process, then
# the minor page faults per call of a jitted program whose 128 MiB output is allocated afresh at
# every call (freed before the next), as a training step's temporaries are.
SCRIPT = """
import os, resource, sys
print("start", os.environ.get("GLIBC_TUNABLES", ""), flush=True)
from deepseek_jax import cli

def main(argv):
  import jax, jax.numpy as jnp
  f = jax.jit(lambda x: x * 2.0 + 1.0)
  x = jnp.ones((4096, 8192), jnp.float32)
  f(x).block_until_ready()
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(4):
    f(x).block_until_ready()
  print("args", argv[1:])
  print("faults", (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4)

cli.run(main, huge_pages=True)
"""


@pytest.mark.parametrize("environ, thp, libc, tunables", [
    ({}, "madvise", GLIBC, "glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", GLIBC,
     "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", GLIBC, None),  # the user's choice
    ({"DEEPSEEK_JAX_HUGE_PAGES": "0"}, "madvise", GLIBC, None),
    ({"DEEPSEEK_JAX_HUGE_PAGES": "1"}, "madvise", GLIBC, "glibc.malloc.hugetlb=1"),
    ({}, "always", GLIBC, None),   # huge pages already, without asking
    ({}, "never", GLIBC, None),
    ({}, None, GLIBC, None),       # no THP in this kernel, or not Linux
    ({}, "madvise", ("glibc", "2.34"), None),  # the tunable came in glibc 2.35
    ({}, "madvise", ("glibc", "2.40"), "glibc.malloc.hugetlb=1"),
    ({}, "madvise", ("", ""), None),           # musl and the like
])
def test_huge_pages_environ(environ, thp, libc, tunables):
  env = host_memory.huge_pages_environ({"PATH": "/bin", **environ}, thp=thp, libc=libc)
  if tunables is None:
    assert env is None
  else:
    assert env == {"PATH": "/bin", **environ, "GLIBC_TUNABLES": tunables}


@pytest.mark.parametrize("text, mode", [
    ("always [madvise] never\n", "madvise"), ("[always] madvise never\n", "always"),
    ("always madvise [never]\n", "never"), ("garbled\n", None)])
def test_transparent_huge_pages_reads_the_selected_mode(tmp_path, text, mode):
  path = tmp_path / "enabled"
  path.write_text(text)
  assert host_memory.transparent_huge_pages(str(path)) == mode
  assert host_memory.transparent_huge_pages(str(tmp_path / "missing")) is None


def _run(**env_changes):
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.OPT_OUT)}
  env.update(env_changes)
  r = subprocess.run([sys.executable, "-c", SCRIPT, "--verbosity=0", "extra"], env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  starts = [line.partition(" ")[2] for line in lines if line.startswith("start")]
  args = next(line for line in lines if line.startswith("args"))
  faults = float(next(line for line in lines if line.startswith("faults")).split()[1])
  return starts, args, faults


def test_a_training_command_line_starts_again_with_huge_pages_where_they_help():
  expected = host_memory.huge_pages_environ(
      {}, thp=host_memory.transparent_huge_pages(), libc=platform.libc_ver())
  starts, args, faults = _run()
  opt_out_starts, opt_out_args, opt_out_faults = _run(**{host_memory.OPT_OUT: "0"})
  assert opt_out_starts == [""]
  assert args == opt_out_args == "args ['extra']"  # the same command, flags parsed as before
  if sys.platform != "linux" or expected is None:
    assert starts == [""]
    pytest.skip("this machine gets nothing from the tunable (not Linux with glibc 2.35+ and "
                f"THP on request; THP: {host_memory.transparent_huge_pages()})")
  assert starts == ["", "glibc.malloc.hugetlb=1"]  # once more, with the tunable, and no further
  # 128 MiB in 4 KiB pages: 32768 faults a call; in 2 MiB pages, a few hundred at most
  assert opt_out_faults > 16000, opt_out_faults
  assert faults < opt_out_faults / 10, (faults, opt_out_faults)
