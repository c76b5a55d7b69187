"""Distillation: the KL losses against plain references, traces that train through the chat
format (the CLI end to end), and logit distillation lowering the held-out KL to the teacher."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import chat, distill_loss, get_preset, metrics, trainer
from deepseek_jax.distillation import (DistillConfig, distill, read_prompts, trace_row,
                                       write_jsonl, write_traces)
from deepseek_jax.train_config import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = dict(peak_flops=1e11, progress=False, tensorboard=False)


# ------------------------------------------------------------------------------------ losses


def _ref_kl(zt, zs, k, tau):
  """numpy: KL of the teacher's and student's distributions collapsed onto top-k + one bucket
  (k = V: the full KL), per position, by explicit sets."""
  def softmax(z):
    e = np.exp(z / tau - np.max(z / tau, -1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
  p, q = softmax(zt.astype(np.float64)), softmax(zs.astype(np.float64))
  out = np.zeros(zt.shape[:-1])
  for pos in np.ndindex(*zt.shape[:-1]):
    top = np.argsort(-zt[pos])[:k]
    kl = sum(p[pos][v] * np.log(p[pos][v] / q[pos][v]) for v in top)
    rest = [v for v in range(zt.shape[-1]) if v not in set(top)]
    if rest:
      pr, qr = p[pos][rest].sum(), q[pos][rest].sum()
      kl += pr * np.log(pr / qr)
    out[pos] = kl
  return out, p, q


def _ref_grad(zt, k, p, q, mask, tau):
  """Analytic d loss / d student logits: τ·(q_v − p_v)·m/N inside the top-k, τ·q_v·(1 − p_r/q_r)
  ·m/N outside it (the bucket's share)."""
  g = np.zeros_like(p)
  n = mask.sum()
  for pos in np.ndindex(*zt.shape[:-1]):
    top = np.argsort(-zt[pos])[:k]
    inside = np.zeros(zt.shape[-1], bool)
    inside[top] = True
    pr, qr = p[pos][~inside].sum(), q[pos][~inside].sum()
    g[pos] = np.where(inside, q[pos] - p[pos], q[pos] * (1 - (pr / qr if qr > 0 else 0)))
    g[pos] *= tau * mask[pos] / n
  return g


@pytest.mark.parametrize("k,tau", [(1, 1.0), (4, 2.0), (13, 0.7), (None, 1.0), (None, 1.5)])
def test_forward_kl_and_gradient_match_references(k, tau):
  rng = np.random.default_rng(0)
  v = 13
  zt = rng.normal(size=(2, 5, v)).astype(np.float32) * 3
  zs = rng.normal(size=(2, 5, v)).astype(np.float32) * 2
  mask = (rng.random((2, 5)) > 0.3).astype(np.float32)
  teacher = (jnp.asarray(zt) if k is None else
             jax.jit(distill_loss.teacher_topk, static_argnums=1)(jnp.asarray(zt), k, tau))
  kk = v if k is None else k

  def loss(s):
    return distill_loss.forward_kl(teacher, s, jnp.asarray(mask), tau)[0]
  value, grad = jax.jit(jax.value_and_grad(loss))(jnp.asarray(zs))
  per_pos, p, q = _ref_kl(zt, zs, kk, tau)
  want = tau ** 2 * (per_pos * mask).sum() / mask.sum()
  np.testing.assert_allclose(float(value), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(grad), _ref_grad(zt, kk, p, q, mask, tau),
                             rtol=1e-4, atol=1e-6)


def test_topk_over_the_whole_vocabulary_equals_full_and_bounds_it_below():
  rng = np.random.default_rng(1)
  zt = jnp.asarray(rng.normal(size=(3, 4, 17)) * 4, jnp.float32)
  zs = jnp.asarray(rng.normal(size=(3, 4, 17)), jnp.float32)
  kl_full, kl_topk = jax.jit(distill_loss.kl_full), jax.jit(distill_loss.kl_topk)
  teacher_topk = jax.jit(distill_loss.teacher_topk, static_argnums=1)
  full = kl_full(zt, zs)
  top_all = teacher_topk(zt, 17)
  assert bool(jnp.all(jnp.isneginf(top_all.log_rest)))
  np.testing.assert_allclose(kl_topk(top_all, zs), full, rtol=1e-5, atol=1e-6)
  grad = jax.jit(jax.grad(lambda t, s: distill_loss.forward_kl(t, s)[0], argnums=1))
  g_full, g_top = grad(zt, zs), grad(top_all, zs)
  assert bool(jnp.all(jnp.isfinite(g_top)))
  np.testing.assert_allclose(g_top, g_full, rtol=1e-4, atol=1e-7)
  for k in (1, 3, 8):
    top = teacher_topk(zt, k)
    mass = jnp.exp(top.logp).sum(-1) + jnp.exp(top.log_rest)
    np.testing.assert_allclose(mass, 1.0, rtol=1e-5)
    assert bool(jnp.all(kl_topk(top, zs) <= full + 1e-6))
  # a student equal to the teacher has zero KL either way
  np.testing.assert_allclose(kl_topk(teacher_topk(zt, 3), zt), 0, atol=1e-6)
  with pytest.raises(ValueError, match="k=18"):
    distill_loss.teacher_topk(zt, 18)


# ------------------------------------------------------------------------------------ a teacher


def _sums(n, seed):
  r = random.Random(seed)
  return [(r.randint(0, 99), r.randint(0, 99)) for _ in range(n)]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  """A tiny V3 trained briefly on sums (a trainer workdir: from_pretrained reads it), with a
  held-out text of the same kind."""
  root = tmp_path_factory.mktemp("distill")
  (root / "train.txt").write_text("".join(f"{a} + {b} = {a + b}\n" for a, b in _sums(3000, 0)))
  (root / "heldout.txt").write_text("".join(f"{a} + {b} = {a + b}\n" for a, b in _sums(120, 1)))
  trainer.train(TrainConfig(preset="tiny_v3", data=str(root / "train.txt"), seq_len=32,
                            batch_size=8, steps=30, learning_rate=3e-3, warmup_steps=0,
                            save_every=1000, workdir=str(root / "teacher"), **QUIET),
                echo=lambda _: None)
  return root


# ------------------------------------------------------------------------------------ traces


def test_cli_traces_train_a_student_through_the_chat_format(teacher, tmp_path):
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": f"{a} + {b} = "}) + "\n"
                             for a, b in _sums(6, 2))
                     + json.dumps({"messages": [{"role": "system", "content": "Add."},
                                                {"role": "user", "content": "1 + 2 = "}]}) + "\n")
  out = tmp_path / "traces.jsonl"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  res = subprocess.run(
      [sys.executable, "-m", "deepseek_jax.distill", f"--teacher={teacher / 'teacher'}",
       f"--prompts={prompts}", f"--output={out}", "--num_samples=3", "--max_new_tokens=12",
       "--temperature=0.8", "--top_p=0.95", "--seed=1", "--keep_truncated"],
      capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "wrote 21 traces for 7 prompts" in res.stderr
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(rows) == 21 and [r["sample"] for r in rows[:3]] == [0, 1, 2]
  assert rows[0]["messages"][0] == {"role": "user", "content": rows[0]["messages"][0]["content"]}
  assert [m["role"] for m in rows[-1]["messages"]] == ["system", "user", "assistant"]
  answers = [r["messages"][-1]["content"] for r in rows]
  assert len(set(answers[:3])) > 1  # three samples of one prompt differ
  assert all(r["logprob"] < 0 for r in rows)
  assert len(chat.read_conversations(out, "chat")) == 21

  # the traces train a fresh student with the trainer's chat format: its loss goes down
  trainer.train(TrainConfig(preset="tiny_v2_lite", data=str(out), data_format="chat",
                            seq_len=64, batch_size=4, steps=10, learning_rate=1e-2,
                            warmup_steps=0, log_every=1, save_every=1000,
                            workdir=str(tmp_path / "student"), **QUIET), echo=lambda _: None)
  losses = [r["loss"] for r in metrics.read_jsonl(str(tmp_path / "student" / "metrics.jsonl"))]
  assert len(losses) == 10 and np.mean(losses[-3:]) < losses[0] - 0.5, losses

  # bad input is one line naming the file and line
  prompts.write_text('{"prompt": "a"}\n{"prompt": 3}\n')
  bad = subprocess.run([sys.executable, "-m", "deepseek_jax.distill",
                        f"--teacher={teacher / 'teacher'}", f"--prompts={prompts}",
                        f"--output={tmp_path / 'other.jsonl'}"], capture_output=True, text=True,
                       env=env, timeout=300, cwd=ROOT)
  assert bad.returncode != 0 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
  assert f"{prompts}:2: expected" in bad.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("fmt", ["messages", "prompt_completion"])
def test_trace_rows_read_back_as_the_trainers_chat_data(tmp_path, fmt):
  convs = [[{"role": "user", "content": "1 + 2 = "}], [{"role": "user", "content": "é?"}]]
  rows = [trace_row(c, a, fmt, sample=0) for c, a in zip(convs, ["3", "ü"])]
  path = str(tmp_path / "t.jsonl")
  write_jsonl(rows[:1], path)
  write_jsonl(rows, path, overwrite=True)
  assert os.listdir(tmp_path) == ["t.jsonl"]  # no temporary left behind
  data_format = "chat" if fmt == "messages" else fmt
  assert chat.read_conversations(path, data_format) == [
      c + [{"role": "assistant", "content": a}] for c, a in zip(convs, ["3", "ü"])]


@pytest.mark.parametrize("text,match", [
    ('{"prompt": "a"}\n{"prompt": 3}\n', r"prompts.jsonl:2: expected"),
    ('{"prompt": "a"}\nnot json\n', r"prompts.jsonl:2: not valid JSON"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n',
     r"prompts.jsonl:1: messages must end with a user message"),
    ('{"messages": [{"role": "robot", "content": "q"}]}\n', r"prompts.jsonl:1: messages\[0\]"),
    ("\n", r"no prompts"),
])
def test_bad_prompt_rows_name_the_file_and_line(tmp_path, text, match):
  (tmp_path / "prompts.jsonl").write_text(text)
  with pytest.raises(ValueError, match=match):
    read_prompts(str(tmp_path / "prompts.jsonl"))


def test_bad_trace_inputs_are_refused_before_sampling(teacher, tmp_path):
  t = str(teacher / "teacher")
  with pytest.raises(FileNotFoundError, match="--prompts=.*missing.jsonl: no such file"):
    write_traces(t, str(tmp_path / "missing.jsonl"), str(tmp_path / "o.jsonl"))
  with pytest.raises(FileNotFoundError, match="--teacher=.*nowhere: no such directory"):
    write_traces(str(tmp_path / "nowhere"), str(tmp_path / "p.jsonl"), str(tmp_path / "o.jsonl"))
  (tmp_path / "o.jsonl").write_text("keep me\n")
  with pytest.raises(FileExistsError, match="--overwrite"):
    write_traces(t, str(tmp_path / "p.jsonl"), str(tmp_path / "o.jsonl"))
  assert (tmp_path / "o.jsonl").read_text() == "keep me\n"
  (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "1 + 1 = "}) + "\n")
  with pytest.raises(ValueError, match="prompt_completion"):
    write_traces(t, str(tmp_path / "p.jsonl"), str(tmp_path / "pc.jsonl"), system="Add.",
                 output_format="prompt_completion", max_new_tokens=4)
  assert not (tmp_path / "pc.jsonl").exists()


# ------------------------------------------------------------------------------------ logits


def _student(tmp_path, **over):
  cfg = get_preset("tiny_v3", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_nextn_predict_layers=0, **over)
  cfg.save(tmp_path / "student")
  return str(tmp_path / "student")


def test_logit_distillation_lowers_held_out_kl(teacher, tmp_path):
  """A 2-layer, 32-wide student against the 3-layer, 64-wide teacher, on the teacher's top-16
  (the full-vocabulary loss is the same loop with the teacher's logits whole; both losses are
  checked against references above)."""
  kl_topk = 16
  dc = DistillConfig(teacher=str(teacher / "teacher"), config_json=_student(tmp_path),
                     data=str(teacher / "train.txt"), eval_data=str(teacher / "heldout.txt"),
                     kl_topk=kl_topk, seq_len=32, batch_size=8, steps=30, learning_rate=3e-3,
                     warmup_steps=0, log_every=10, save_every=30, eval_every=30,
                     workdir=str(tmp_path / "w"), **QUIET)
  last = distill(dc, echo=lambda _: None)
  recs = metrics.read_jsonl(str(tmp_path / "w" / "metrics.jsonl"))
  before, after = recs[0]["eval_kl_init"], last["eval_kl"]
  print(f"held-out KL(teacher || student), kl_topk={kl_topk}: {before:.4f} -> {after:.4f}")
  assert after < 0.7 * before, (before, after)
  assert [r["step"] for r in recs] == [1, 10, 20, 30]
  assert recs[-1]["kl"] < recs[0]["kl"]
  assert os.path.isdir(tmp_path / "w" / "checkpoints" / "30")  # the student alone, resumable


def test_logit_distillation_refuses_mismatched_inputs(teacher, tmp_path):
  base = dict(teacher=str(teacher / "teacher"), data=str(teacher / "train.txt"), seq_len=32,
              batch_size=8, steps=1, workdir=str(tmp_path / "w"), **QUIET)
  with pytest.raises(ValueError, match="--teacher=.*vocab_size 512 differs from the student's "
                     "600"):
    distill(DistillConfig(config_json=_student(tmp_path, vocab_size=600), **base),
            echo=lambda _: None)
  with pytest.raises(ValueError, match="--kl_topk=-1"):
    DistillConfig(kl_topk=-1)
  with pytest.raises(ValueError, match="--kl_temperature=0"):
    DistillConfig(kl_temperature=0.0)
  with pytest.raises(FileNotFoundError, match="--teacher=.*nowhere"):
    distill(DistillConfig(**{**base, "teacher": str(tmp_path / "nowhere")}), echo=lambda _: None)
