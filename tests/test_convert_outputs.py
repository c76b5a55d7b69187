"""Where outputs may go: never onto, into or around an input (converters, trainer, demo); stale
temporaries of killed runs are removed by the next run; outputs follow the user's umask."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax.numpy as jnp
import pytest

from deepseek_jax import demo, get_preset, trainer
from deepseek_jax.convert import atomic
from deepseek_jax.convert.to_hf import export
from deepseek_jax.convert.to_orbax import convert
from deepseek_jax.train_config import TrainConfig
from hf_reference import save_hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  d = tmp_path_factory.mktemp("release") / "hf"
  save_hf(get_preset("tiny_v2_lite", num_nextn_predict_layers=0), d, max_shard_size="60KB")
  return d


def _listing(d):
  return sorted((p, os.path.getsize(os.path.join(r, p))) for r, _, fs in os.walk(d) for p in fs)


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_converters_refuse_an_output_onto_into_or_around_the_input(release, tmp_path, where):
  src = tmp_path / "models" / "hf"
  shutil.copytree(release, src)
  out = {"same": src, "inside": src / "orbax", "around": tmp_path / "models"}[where]
  before = _listing(src)
  how = {"same": "is the input", "inside": "lies inside", "around": "contains"}[where]
  with pytest.raises(ValueError, match=f"{how}.*hf_dir="):
    convert(src, out, overwrite=True)
  with pytest.raises(ValueError, match=f"{how}.*checkpoint_dir="):
    export(src, out, overwrite=True)
  assert _listing(src) == before and not os.path.exists(src / "orbax")


def test_cli_overwrite_onto_the_source_is_refused_and_the_source_kept(release, tmp_path):
  """The issue's command: `hf_to_orbax --hf_dir=M --output_dir=M --overwrite` deleted M."""
  src = tmp_path / "M"
  shutil.copytree(release, src)
  before = _listing(src)
  r = subprocess.run([sys.executable, "-m", "deepseek_jax.convert.hf_to_orbax", f"--hf_dir={src}",
                      f"--output_dir={src}", "--overwrite"], cwd=ROOT, capture_output=True,
                     text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
  assert f"output_dir={src} is the input hf_dir={src}" in r.stderr
  assert _listing(src) == before and sorted(os.listdir(tmp_path)) == ["M"]


def test_trainer_refuses_a_workdir_at_its_init_from(tmp_path, release):
  for workdir in (release, release / "run"):
    with pytest.raises(ValueError, match="--workdir=.*--init_from="):
      trainer.train(TrainConfig(init_from=str(release), workdir=str(workdir), data="x"))
  assert not os.path.exists(release / "run")


def test_demo_empties_only_an_earlier_demos_workdir(tmp_path):
  mine = tmp_path / "important"
  mine.mkdir()
  (mine / "thesis.tex").write_text("years of work")
  (mine / "metrics.jsonl").write_text("")
  with pytest.raises(ValueError, match="'thesis.tex'"):
    demo.clear_workdir(str(mine))
  assert (mine / "thesis.tex").read_text() == "years of work"
  earlier = tmp_path / "demo"
  (earlier / "checkpoints" / "12").mkdir(parents=True)
  (earlier / "metrics.jsonl").write_text("{}\n")
  demo.clear_workdir(str(earlier))
  assert not earlier.exists()


def _dead_pid() -> int:
  p = subprocess.Popen(["true"])
  p.wait()
  return p.pid


def test_sigkilled_conversion_leaves_a_temporary_the_next_run_removes(release, tmp_path, caplog):
  out = tmp_path / "out"
  proc = subprocess.Popen([sys.executable, "-m", "deepseek_jax.convert.hf_to_orbax",
                           f"--hf_dir={release}", f"--output_dir={out}", "--dtype=float32"],
                          cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  try:
    while time.time() < deadline and proc.poll() is None:
      if any(n.startswith(".out.tmp-") for n in os.listdir(tmp_path)):
        proc.send_signal(signal.SIGKILL)
        break
      time.sleep(0.005)
  finally:
    rc = proc.wait(timeout=60)
  assert rc == -signal.SIGKILL, f"the conversion ended before it could be killed (rc {rc})"
  left = [n for n in os.listdir(tmp_path) if n.startswith(".out.tmp-")]
  assert left and not out.exists()
  # another kind of leftover: an old output renamed aside, its process gone; and one of a live
  # process (this one), which must stay
  stale_old = tmp_path / f".out.old-{_dead_pid()}@{socket.gethostname()}-abc"
  live = tmp_path / f".out.tmp-{os.getpid()}@{socket.gethostname()}-xyz"
  stale_old.mkdir()
  live.mkdir()
  with caplog.at_level(logging.WARNING):
    convert(release, out, dtype=jnp.float32)
  assert sorted(os.listdir(tmp_path)) == [live.name, "out"]
  said = " ".join(r.getMessage() for r in caplog.records)
  assert all(n in said for n in left + [stale_old.name]) and "interrupted run" in said


def test_outputs_follow_the_umask(release, tmp_path):
  old = os.umask(0o027)
  try:
    convert(release, tmp_path / "o", dtype=jnp.float32)
    export(tmp_path / "o", tmp_path / "h")
  finally:
    os.umask(old)
  for d in ("o", "h"):
    assert os.stat(tmp_path / d).st_mode & 0o777 == 0o750, d
  assert os.stat(tmp_path / "h" / "config.json").st_mode & 0o777 == 0o640
  assert atomic.remove_stale_temporaries(tmp_path / "o") == []
