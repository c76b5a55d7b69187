"""The GRPO loop end to end on a tiny model: reward rises on a trivially learnable task; a run
SIGKILLed after a checkpoint and restarted logs what an uninterrupted run logs; the router bias
frozen or updating by flag; the CLI's flag errors are one line naming the flag."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from deepseek_jax import grpo_trainer, metrics, tasks
from deepseek_jax.grpo_config import GRPOConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW = 6


def alnum_reward(prompts, completions, **_):
  """Share of the completion's positions holding an ASCII letter or digit: a dense signal a
  random tiny model already gets sometimes (62 of its 512 tokens)."""
  return [sum(c.isascii() and c.isalnum() for c in text) / NEW for text in completions]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
  path = tmp_path_factory.mktemp("prompts") / "add.jsonl"
  return tasks.write_jsonl(path, tasks.addition_rows(24, digits=1, seed=0))


def _config(prompts, workdir, **kw):
  base = dict(preset="tiny_v3", prompts=prompts, prompt_format="raw", group_size=8,
              prompts_per_step=2, max_new_tokens=NEW, moe_dispatch="dense", progress=False,
              log_samples=0, tensorboard=False, workdir=str(workdir), seed=1)
  return GRPOConfig(**{**base, **kw})


def test_reward_rises_on_a_trivially_learnable_task(prompts, tmp_path):
  gc = _config(prompts, tmp_path / "w", steps=10, learning_rate=3e-2, beta=0.0,
               updates_per_batch=2)
  grpo_trainer.run(gc, reward_fns={"alnum": alnum_reward})
  rows = metrics.read_jsonl(str(tmp_path / "w" / "metrics.jsonl"))
  assert [r["step"] for r in rows] == list(range(1, 11))
  reward = [r["reward_mean"] for r in rows]
  first, last = np.mean(reward[:3]), np.mean(reward[-3:])
  assert last > first + 0.2, reward
  for key in ("reward_std", "kl", "clip_fraction", "entropy", "response_length",
              "sampler_tokens_per_s", "learner_tokens_per_s"):
    assert all(np.isfinite(r[key]) for r in rows), key
  assert max(r["clip_fraction"] for r in rows) > 0  # the second update of a batch clips some


KILL_STEPS, KILL_SAVE = 12, 4
KILL_FLAGS = dict(learning_rate=1e-2, beta=0.01, updates_per_batch=2, save_every=KILL_SAVE)
# The run as a separate process (so it can be SIGKILLed), with this module's reward.
DRIVER = """
import sys
sys.path.insert(0, {tests!r})
from test_grpo_train import KILL_FLAGS, KILL_STEPS, _config, alnum_reward
from deepseek_jax import grpo_trainer
grpo_trainer.run(_config({prompts!r}, {workdir!r}, steps=KILL_STEPS, **KILL_FLAGS),
                 reward_fns={{"alnum": alnum_reward}})
"""


def _driver(prompts, workdir):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  code = DRIVER.format(tests=os.path.join(ROOT, "tests"), prompts=prompts, workdir=str(workdir))
  return [sys.executable, "-c", code], env


def test_killed_and_restarted_run_logs_what_an_uninterrupted_one_logs(prompts, tmp_path):
  """Run A: 12 steps straight, in this process. Run B: the same in a child process, SIGKILLed
  after its step-4 checkpoint is committed and step 6 is logged, then started again: it resumes
  from step 4 (prompt position, sampling noise, optimizer) and logs A's figures, bit for bit."""
  a = grpo_trainer.run(_config(prompts, tmp_path / "a", steps=KILL_STEPS, **KILL_FLAGS),
                       reward_fns={"alnum": alnum_reward})
  killed = tmp_path / "b"
  cmd, env = _driver(prompts, killed)
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
  deadline = time.time() + 240
  try:
    while time.time() < deadline and proc.poll() is None:
      logged = metrics.read_jsonl(str(killed / "metrics.jsonl"))
      committed = os.path.isdir(killed / "checkpoints" / str(KILL_SAVE))
      if committed and logged and logged[-1]["step"] >= KILL_SAVE + 2:
        proc.send_signal(signal.SIGKILL)
        break
      time.sleep(0.01)
  finally:
    rc = proc.wait(timeout=60)
  assert rc == -signal.SIGKILL, f"the run was not killed mid-way (rc {rc}): " + (
      proc.stderr.read().decode()[-2000:])
  proc.stderr.close()
  logged = [r["step"] for r in metrics.read_jsonl(str(killed / "metrics.jsonl"))]
  assert KILL_SAVE + 2 <= logged[-1] < KILL_STEPS  # it died between the checkpoint and the end
  done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  resumed = [int(x) for x in re.findall(r"resumed from step (\d+)", done.stderr)]
  assert resumed and KILL_SAVE <= resumed[0] < logged[-1], done.stderr[-2000:]
  ra = metrics.read_jsonl(str(tmp_path / "a" / "metrics.jsonl"))
  rb = metrics.read_jsonl(str(killed / "metrics.jsonl"))
  assert [r["step"] for r in ra] == [r["step"] for r in rb] == list(range(1, KILL_STEPS + 1))
  for key in ("reward_mean", "reward_std", "loss", "kl", "clip_fraction", "entropy",
              "response_length", "grad_norm"):
    assert [r[key] for r in ra] == [r[key] for r in rb], key
  assert ra[-1]["kl"] > 0 and ra[-1]["grad_norm"] > 0 and a["loss"] == rb[-1]["loss"]


@pytest.mark.parametrize("flag, message", [
    ("--group_size=1", "--group_size=1"),
    ("--temperature=0", "--temperature=0"),
    ("--reward=maths", "--reward=maths"),
])
def test_cli_flag_errors_are_one_line(prompts, tmp_path, flag, message):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  r = subprocess.run([sys.executable, "-m", "deepseek_jax.grpo", "--preset=tiny_v3",
                      f"--prompts={prompts}", f"--workdir={tmp_path / 'w'}", flag],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode != 0
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and message in lines[0], r.stderr[-2000:]


@pytest.mark.parametrize("speed", [0.0, 0.05], ids=["frozen", "updating"])
def test_router_bias_frozen_or_updating_by_flag(speed):
  """--bias_update_speed=0 leaves the router biases as they were; > 0 moves them (the
  auxiliary-loss-free balancing rule on the batch's expert counts); the weights move both ways."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from deepseek_jax import get_preset, grpo_step, optim
  from deepseek_jax.model import DeepseekForCausalLM
  from deepseek_jax.sampling import SamplingParams

  cfg = get_preset("tiny_v3", moe_dispatch="dense")
  graphdef, params, frozen, rest = nnx.split(DeepseekForCausalLM(cfg, rngs=nnx.Rngs(0)),
                                             nnx.Param, nnx.Param, ...)
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-3, warmup_steps=0, total_steps=1))
  state = {"params": params, "frozen": frozen, "rest": rest, "opt_state": tx.init(params),
           "step": jnp.zeros((), jnp.int32)}
  rng = np.random.default_rng(0)
  mask = np.zeros((4, 15), np.float32)
  mask[:, 5:] = 1
  batch = {"tokens": rng.integers(0, cfg.vocab_size, (4, 16)).astype(np.int32), "mask": mask,
           "old_logp": np.full((4, 15), -6.0, np.float32),
           "advantages": np.array([1.0, -1.0, 1.0, -1.0], np.float32)}
  update = jax.jit(grpo_step.make_update(
      graphdef, tx, cfg, SamplingParams(1.0), epsilon=0.2, epsilon_high=None, beta=0.0,
      loss_type="grpo", max_len=10, replay=False, bias_update_speed=speed))
  before = jax.tree.map(np.asarray, (state["params"], state["rest"]))
  new, logs = update(state, batch)
  assert float(logs["grad_norm"]) > 0
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool((a != np.asarray(b)).any()),
                                       before[0], new["params"]))
  assert any(moved)
  bias_moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool((a != np.asarray(b)).any()),
                                            before[1], new["rest"]))
  assert bias_moved and any(bias_moved) == (speed > 0)
