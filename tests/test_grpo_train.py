"""The GRPO loop end to end on a tiny model: reward rises on a trivially learnable task; a run
stopped after a checkpoint and restarted logs what an uninterrupted run logs; the CLI's flag
errors are one line naming the flag."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

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


def test_stopped_and_restarted_run_logs_what_an_uninterrupted_one_logs(prompts, tmp_path):
  """Run A: 4 steps straight. Run B: 3 steps with a checkpoint at 2, its last checkpoint removed
  (as if killed after step 3 was logged and before it was saved), then restarted to 4: it resumes
  from step 2 (prompt position, sampling noise, optimizer) and logs A's figures."""
  kw = dict(learning_rate=1e-2, beta=0.01, updates_per_batch=2, save_every=2)
  fns = {"alnum": alnum_reward}
  a = grpo_trainer.run(_config(prompts, tmp_path / "a", steps=4, **kw), reward_fns=fns)
  grpo_trainer.run(_config(prompts, tmp_path / "b", steps=3, **kw), reward_fns=fns)
  shutil.rmtree(tmp_path / "b" / "checkpoints" / "3")
  echoed = []
  b = grpo_trainer.run(_config(prompts, tmp_path / "b", steps=4, **kw), reward_fns=fns,
                       echo=echoed.append)
  assert any("resumed from step 2" in e for e in echoed), echoed
  ra = metrics.read_jsonl(str(tmp_path / "a" / "metrics.jsonl"))
  rb = metrics.read_jsonl(str(tmp_path / "b" / "metrics.jsonl"))
  assert [r["step"] for r in ra] == [r["step"] for r in rb] == [1, 2, 3, 4]
  for key in ("reward_mean", "reward_std", "loss", "kl", "clip_fraction", "entropy",
              "response_length", "grad_norm"):
    assert [r[key] for r in ra] == [r[key] for r in rb], key
  assert a["loss"] == b["loss"] and ra[-1]["kl"] > 0 and ra[-1]["grad_norm"] > 0


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
