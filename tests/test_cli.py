"""Every CLI fails on bad input with one line on stderr and exit status 2 (`deepseek_jax.cli`),
keeps the traceback for anything unexpected, and is quiet by default."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, env_extra=None, drop=(), timeout=120):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env_extra or {})}
  for k in drop:
    env.pop(k, None)
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, env=env)


# (module, arguments, what the one line must say). Each was a traceback, a hang or a
# ZeroDivisionError before the shared helper and the range checks.
BAD = [
    ("deepseek_jax.generate_text", ["--model_dir=x", "--prompt=Hi", "--chunk=0"], "--chunk=0"),
    ("deepseek_jax.generate_text", ["--model_dir=/nonexistent", "--prompt=Hi"],
     "/nonexistent: not a directory"),
    ("deepseek_jax.generate_text", ["--prompt=Hi"], "--model_dir is required"),
    ("deepseek_jax.sharding.plan", ["--preset=tiny_v3", "--mesh=fsdp=0"], "'fsdp=0'"),
    ("deepseek_jax.convert.plan", ["--config=/nonexistent"], "/nonexistent: no config.json"),
    ("deepseek_jax.convert.hf_to_orbax", ["--hf_dir=/nonexistent"], "--output_dir"),
    ("deepseek_jax.convert.orbax_to_hf", ["--checkpoint_dir=/nonexistent", "--output_dir=/tmp/x"],
     "/nonexistent"),
    ("deepseek_jax.train", ["--preset=tiny_v3", "--data=x", "--workdir=/tmp/x", "--steps=0"],
     "--steps=0"),
    ("deepseek_jax.train", ["--preset=tiny_v3", "--data=/nonexistent", "--workdir=/tmp/x"],
     "--data=/nonexistent"),
    ("deepseek_jax.demo", ["--steps=0"], "--steps=0"),
]


@pytest.mark.parametrize("module,args,says", BAD, ids=[f"{m.split('.')[-1]}:{a[-1]}"
                                                        for m, a, _ in BAD])
def test_bad_input_is_one_line_and_status_2(module, args, says):
  r = _run("-m", module, *args)
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1, (r.returncode, r.stderr[-3000:])
  assert lines[0].startswith(f"{module}: error: ") and says in lines[0], lines[0]


def test_unexpected_errors_keep_the_traceback_and_verbosity_shows_expected_ones():
  code = ("import sys\nfrom deepseek_jax import cli\n"
          "def main(argv):\n  raise {}('boom')\n"
          "cli.run(main)\n")
  r = _run("-c", code.format("RuntimeError"))
  assert r.returncode == 1 and "Traceback" in r.stderr and "RuntimeError: boom" in r.stderr
  r = _run("-c", code.format("ValueError"))
  assert r.returncode == 2 and r.stderr.strip().splitlines() == ["-c: error: boom"], r.stderr
  r = _run("-c", code.format("ValueError"), "--verbosity=1")
  assert r.returncode == 1 and "Traceback" in r.stderr and "ValueError: boom" in r.stderr


def test_plan_clis_probe_no_accelerator_and_log_nothing(tmp_path):
  """JAX_PLATFORMS unset: the plan CLIs pin the CPU themselves (no "Unable to initialize
  backend" line) and print only their table."""
  from deepseek_jax import get_preset
  get_preset("tiny_v3").save(tmp_path)
  for module, args, says in [
      ("deepseek_jax.convert.plan", [f"--config={tmp_path}"], "released tensors"),
      ("deepseek_jax.sharding.plan", ["--preset=tiny_v3", "--mesh=fsdp=2", "--batch=4",
                                      "--seq_len=16", "--device=v5p"], "fits v5p")]:
    r = _run("-m", module, *args, drop=("JAX_PLATFORMS",))
    assert r.returncode == 0 and r.stderr == "", (module, r.stderr[-3000:])
    assert says in r.stdout, r.stdout[-2000:]
