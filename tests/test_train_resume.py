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
