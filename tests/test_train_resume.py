"""Kill and restart: 2N uninterrupted steps equal N steps, SIGKILL, restart, N more, bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from deepseek_jax import metrics, trainer
from deepseek_jax.train_config import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.dirname(json.__file__)
N = 60
FLAGS = dict(preset="tiny_v3", data=CORPUS, seq_len=64, batch_size=8, learning_rate=3e-3,
             warmup_steps=10, moe_dispatch="dense", peak_flops=1e11, save_every=N, log_every=1,
             grad_accum=2, seed=3)


def _command(workdir):
  args = [f"--{k}={v}" for k, v in FLAGS.items()]
  return [sys.executable, "-m", "deepseek_jax.train", *args, f"--steps={2 * N}",
          f"--workdir={workdir}", "--noprogress"]


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _final_state(workdir, step):
  return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step),
                                                         "state"))


def test_sigkill_and_restart_reproduce_the_uninterrupted_run(tmp_path):
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  trainer.train(TrainConfig(**FLAGS, steps=2 * N, workdir=str(straight), progress=False))

  proc = subprocess.Popen(_command(killed), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
  deadline = time.time() + 240
  try:
    while time.time() < deadline and proc.poll() is None:
      steps = [r["step"] for r in metrics.read_jsonl(str(killed / "metrics.jsonl"))]
      committed = os.path.isdir(killed / "checkpoints" / str(N))
      if committed and steps and steps[-1] >= N + 3:
        proc.send_signal(signal.SIGKILL)
        break
      time.sleep(0.01)
  finally:
    rc = proc.wait(timeout=60)
  assert rc == -signal.SIGKILL, f"the run was not killed mid-way (rc {rc}): " + (
      proc.stderr.read().decode()[-2000:])
  proc.stderr.close()
  logged = [r["step"] for r in metrics.read_jsonl(str(killed / "metrics.jsonl"))]
  assert N + 3 <= logged[-1] < 2 * N  # it died between the checkpoint and the end

  done = subprocess.run(_command(killed), cwd=ROOT, env=_env(), capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"resumed from step {N}" in done.stderr

  a = metrics.read_jsonl(str(straight / "metrics.jsonl"))
  b = metrics.read_jsonl(str(killed / "metrics.jsonl"))
  assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 2 * N + 1))
  for key in ("loss", "mtp_loss", "aux_loss", "grad_norm", "load_cv/layer1"):
    assert [r[key] for r in a] == [r[key] for r in b], key  # bit for bit
  sa, sb = _final_state(straight, 2 * N), _final_state(killed, 2 * N)
  flat_a = jax.tree_util.tree_leaves_with_path(sa)
  flat_b = jax.tree_util.tree_leaves_with_path(sb)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b] and len(flat_a) > 100
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def _run_and_kill(workdir, command, until):
  """Starts `command`, SIGKILLs it once until() holds; returns the logged steps then."""
  proc = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
  deadline = time.time() + 240
  try:
    while time.time() < deadline and proc.poll() is None:
      if until():
        proc.send_signal(signal.SIGKILL)
        break
      time.sleep(0.005)
  finally:
    rc = proc.wait(timeout=60)
  err = proc.stderr.read().decode()
  proc.stderr.close()
  assert rc == -signal.SIGKILL, f"the run was not killed mid-way (rc {rc}): {err[-2000:]}"
  return metrics.read_jsonl(str(workdir / "metrics.jsonl"))


def test_killed_before_its_first_checkpoint_logs_each_step_once(tmp_path):
  """Before: the restart from step 0 appended to metrics.jsonl (1..k, then 1..20 again)."""
  w = tmp_path / "w"
  command = [a for a in _command(w) if not a.startswith(("--steps=", "--save_every=",
                                                          "--grad_accum=", "--seq_len="))]
  command += ["--steps=20", "--save_every=100", "--grad_accum=1", "--seq_len=32"]

  def until():
    return len(metrics.read_jsonl(str(w / "metrics.jsonl"))) >= 3 and not os.path.isdir(
        w / "checkpoints" / "20")
  before = _run_and_kill(w, command, until)
  assert before and not any(n.isdigit() for n in os.listdir(w / "checkpoints"))
  done = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  after = metrics.read_jsonl(str(w / "metrics.jsonl"))
  assert [r["step"] for r in after] == list(range(1, 21))
  for a, b in zip(before, after):  # the same steps again, from scratch: the same losses
    assert (a["step"], a["loss"]) == (b["step"], b["loss"])


def test_a_save_commits_before_the_next_one_starts(tmp_path):
  """Saves are asynchronous: a kill before a save commits (measured: 0.3-0.8 s, 3-7 tiny_v3
  steps on a 2-core CPU) resumes from the checkpoint before. The next save waits for the
  commit, so at most one checkpoint is ever pending."""
  from deepseek_jax import get_preset
  from deepseek_jax.workdir import Checkpointer
  state = {"w": np.ones((256, 1024), np.float32), "step": np.int32(0)}
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep=3)
  cfg = get_preset("tiny_v3")
  ckpt.save(1, state, {"epoch": 0, "index": 0}, cfg)
  ckpt.save(2, state, {"epoch": 0, "index": 1}, cfg)
  assert os.path.isdir(tmp_path / "checkpoints" / "1")  # committed when save(2) began
  ckpt.close()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
