"""The GRPO loop: sample groups with the latent-cache sampler, score them, take clipped
policy-gradient steps, all on one mesh; exact resume.

`run(GRPOConfig(...))` is what `python -m deepseek_jax.grpo` calls. Each step:
  1. the next `prompts_per_step` prompt rows (a seeded shuffle, epoch after epoch; its position
     is saved with each checkpoint);
  2. `generation.Generation` samples G completions of each (one prefill per prompt, its latent
     cache copied G ways; each token's log-probability under the sampling distribution; with
     routing replay, each token's experts) with noise seeded by (seed, step);
  3. the rewards (`rewards`) score the decoded completions; `grpo_step.learner_batch` lays the
     rollouts out with group-normalised advantages;
  4. with β > 0 the reference's log-probabilities, once (`grpo_step.make_reference_fn`);
  5. μ = `updates_per_batch` AdamW steps on the GRPO loss (`grpo_step.make_update`).
Metrics go to `metrics.jsonl` (one row per logged step: `step`, `reward_mean`, `reward_std`,
`accuracy`, `reward/<name>`, `kl`, `clip_fraction`, `loss`, `entropy`, `response_length`,
`sampler_tokens_per_s`, `learner_tokens_per_s`, ...) and TensorBoard. Checkpoints are the SFT
trainer's layout ({"params", "rest", "opt_state", "step"}, the prompt position, and a meta
record naming the base and the LoRA settings), so `from_pretrained(workdir)` returns the policy
(adapters merged) and a rerun resumes: the sampling noise is a function of (seed, step), so a
killed and restarted run draws the same completions and computes the same losses.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax import adapters, chat, grpo_step, optim, rewards, train_data, workdir
from deepseek_jax import data as data_lib
from deepseek_jax import metrics as metrics_lib
from deepseek_jax.dtypes import from_name
from deepseek_jax.generation import Generation, generate
from deepseek_jax.grpo_config import GRPOConfig
from deepseek_jax.sampling import SamplingParams
from deepseek_jax.trainer import build_model, close_run, make_mesh, model_config, split_state
from deepseek_jax.workdir import Checkpointer

SAVED = ("params", "rest", "opt_state", "step")


# ------------------------------------------------------------------------------------ prompts
def read_prompts(path: str, need: Sequence[str] = ()) -> list[dict[str, Any]]:
  """Rows of a prompts JSONL file: each an object with a string "prompt" and the columns `need`
  names (e.g. "answer" for the math reward); errors name the file and line."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--prompts={path}: no such file (expected JSONL rows "
                            '{"prompt": ..., "answer": ...})')
  rows = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
      if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
        raise ValueError(f'{path}:{n}: expected an object with a string "prompt"')
      missing = [c for c in need if c not in row]
      if missing:
        raise ValueError(f"{path}:{n}: no {missing[0]!r} field (the reward needs it)")
      rows.append(row)
  if not rows:
    raise ValueError(f"--prompts={path}: no prompt rows")
  return rows


def needed_columns(names: Sequence[str]) -> list[str]:
  return [c for n, c in (("math", "answer"), ("code", "tests")) if n in names]


def chat_template_of(path: str | None) -> str:
  """The chat template of a model directory (`chat.read_template`); a trainer workdir without
  its own tokenizer_config.json has the template of the model it started from (--init_from of
  its run, followed back), so a policy fine-tuned from a model keeps that model's format."""
  seen = set()
  while path and os.path.isdir(path) and path not in seen:
    seen.add(path)
    if os.path.isfile(os.path.join(path, "tokenizer_config.json")) or not workdir.is_workdir(path):
      return chat.read_template(path)
    path = workdir.read_meta(path).get("init_from")
  return chat.read_template(None)


def encode_prompts(rows: Sequence[dict], tokenizer, *, fmt: str, template: str | None = None,
                   system: str | None = None) -> list[list[int]]:
  """Token ids of each row's prompt: under the chat template with a generation prompt (chat) or
  the text itself after the tokenizer's bos (raw)."""
  if fmt == "chat":
    t = chat.ChatTemplate(template or chat.DEEPSEEK_TEMPLATE, tokenizer)
    head = [{"role": "system", "content": system}] if system else []
    return [t.prompt(head + [{"role": "user", "content": r["prompt"]}]) for r in rows]
  bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
  return [bos + tokenizer.encode(r["prompt"]) for r in rows]


class PromptSet:
  """Row indices as a dataset for `data.DataIterator` (its position is what a checkpoint keeps)."""

  def __init__(self, n: int):
    self.n = n

  def __len__(self) -> int:
    return self.n

  def get(self, indices) -> np.ndarray:
    return np.asarray(indices, np.int64)


def rollout_seed(seed: int, step: int) -> int:
  """The sampling seed of a step: a function of (seed, step) only, so a resumed run draws the
  completions an uninterrupted one drew."""
  return int(np.random.SeedSequence([seed, step]).generate_state(1)[0] & 0x7FFFFFFF)


def columns_of(rows: Sequence[dict], group: int) -> dict[str, list]:
  """Every field but "prompt", one list per field, each row repeated `group` times."""
  keys = sorted({k for r in rows for k in r if k != "prompt"})
  return {k: [r.get(k) for r in rows for _ in range(group)] for k in keys}


# ------------------------------------------------------------------------------------ evaluation
def accuracy(model, prompt_ids: Sequence[Sequence[int]], rows: Sequence[dict], tokenizer, *,
             reward: str = "math", max_new_tokens: int = 32, batch: int = 64,
             eos_id: int | None = None) -> float:
  """Mean `reward` of greedy completions (the held-out accuracy of a correctness reward)."""
  fn = rewards.REWARDS[reward]
  scores: list[float] = []
  for i in range(0, len(rows), batch):
    ids = [list(p) for p in prompt_ids[i:i + batch]]
    outs = generate(model, ids, max_new_tokens, eos_id=eos_id)
    texts = [tokenizer.decode(o) for o in outs]
    part = rows[i:i + batch]
    scores += fn([r["prompt"] for r in part], texts, **columns_of(part, 1))
  return float(np.mean(scores)) if scores else 0.0


# ------------------------------------------------------------------------------------ the run
# The jitted learner functions by everything they close over: a second `run` in one process (a
# notebook, the demo, a restarted run in a test) reuses their compilations.
_STEP_FNS: dict[Any, tuple[Callable, Callable | None]] = {}


def _step_fns(graphdef, cfg, gc: GRPOConfig, sampling: SamplingParams, tx, state_sh, rep
              ) -> tuple[Callable, Callable | None]:
  """(update, reference or None when β = 0), jitted; see `grpo_step`."""
  leaves, treedef = jax.tree.flatten(state_sh)
  key = (graphdef, cfg, gc.optim_config(), sampling, gc.epsilon, gc.epsilon_high, gc.beta,
         gc.loss_type, gc.max_new_tokens, gc.routing_replay, gc.bias_update_speed,
         bool(gc.lora_rank), tuple(leaves), treedef, rep)
  if key not in _STEP_FNS:
    if len(_STEP_FNS) >= 4:
      _STEP_FNS.clear()
    update = jax.jit(grpo_step.make_update(
        graphdef, tx, cfg, sampling, epsilon=gc.epsilon, epsilon_high=gc.epsilon_high,
        beta=gc.beta, loss_type=gc.loss_type, max_len=gc.max_new_tokens,
        replay=gc.routing_replay, bias_update_speed=gc.bias_update_speed),
        donate_argnums=(0,), out_shardings=(state_sh, rep))
    ref = (jax.jit(grpo_step.make_reference_fn(graphdef, sampling, lora=bool(gc.lora_rank),
                                               replay=gc.routing_replay))
           if gc.beta else None)
    _STEP_FNS[key] = (update, ref)
  return _STEP_FNS[key]


def _echo(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def run_meta(gc: GRPOConfig, cfg) -> dict[str, Any]:
  """A checkpoint's meta record: what `from_pretrained` needs to rebuild the policy (base and
  LoRA settings), and the run's flags."""
  lora = (adapters.lora_fields(gc.lora_rank, gc.lora_alpha, gc.lora_targets) if gc.lora_rank
          else None)
  return {"lora": {**lora, "lora_targets": list(gc.lora_targets)} if lora else None,
          "init_from": os.path.abspath(gc.init_from) if gc.init_from else None,
          "weight_quant": cfg.weight_quant, "grpo_config": gc.to_json()}


def _sampling(gc: GRPOConfig) -> SamplingParams:
  return SamplingParams(gc.temperature, gc.top_k or None, gc.top_p if gc.top_p < 1 else None)


def run(gc: GRPOConfig, *, echo: Callable[[str], None] = _echo,
        reward_fns: dict[str, rewards.Reward] | None = None) -> dict[str, Any]:
  """Runs (or resumes) GRPO as `gc` says; returns the last logged metrics. `reward_fns` replaces
  the built-in rewards named by --reward (a Python API: {name: reward(prompts, completions,
  **columns)}, weighted by --reward_weights)."""
  if not gc.workdir:
    raise ValueError("--workdir is required (checkpoints and metrics.jsonl go there)")
  wd = os.path.abspath(gc.workdir)
  os.makedirs(wd, exist_ok=True)
  if reward_fns is None:
    fns, weights = rewards.resolve(gc.reward, gc.weights())
  else:
    fns = dict(reward_fns)
    w = gc.weights() or (1.0,) * len(fns)
    if len(w) != len(fns):
      raise ValueError(f"--reward_weights: {len(w)} weights for {len(fns)} rewards")
    weights = dict(zip(fns, w))
  rows = read_prompts(gc.prompts, needed_columns(list(fns)))
  cfg = model_config(gc)
  dtype = from_name(gc.compute_dtype, "--compute_dtype")
  mesh = make_mesh(gc)
  tokenizer = train_data.make_tokenizer(gc, cfg.vocab_size)
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(f"--tokenizer={gc.tokenizer}: vocab_size {tokenizer.vocab_size} exceeds the "
                     f"model's vocab_size {cfg.vocab_size}")
  prompt_ids = encode_prompts(rows, tokenizer, fmt=gc.prompt_format,
                              template=chat_template_of(gc.init_from), system=gc.system)
  longest = int(np.argmax([len(p) for p in prompt_ids]))
  if len(prompt_ids[longest]) + gc.max_new_tokens > cfg.max_position_embeddings:
    raise ValueError(f"--prompts={gc.prompts}: row {longest + 1} has {len(prompt_ids[longest])} "
                     f"tokens; with --max_new_tokens={gc.max_new_tokens} that exceeds the model's "
                     f"max_position_embeddings={cfg.max_position_embeddings}")
  n_batch = gc.prompts_per_step * gc.group_size
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if n_batch % shards:
    raise ValueError(f"--prompts_per_step x --group_size = {n_batch} completions is not "
                     f"divisible by the data-parallel size {shards} (data_parallel x fsdp)")
  eos = tokenizer.eos_id if tokenizer.eos_id is not None else cfg.eos_token_id
  it = data_lib.DataIterator(PromptSet(len(rows)), gc.prompts_per_step, gc.seed)
  sampling = _sampling(gc)
  tx = optim.make_optimizer(gc.optim_config())
  schedule = optim.schedule(gc.optim_config())

  with jax.set_mesh(mesh):
    model = build_model(gc, cfg, dtype, echo, mesh)
    cfg = model.cfg
    graphdef, state = split_state(model, tx, gc)
    del model
    lora = bool(gc.lora_rank)
    if gc.beta and not lora:  # full fine-tuning: the reference is a frozen copy of the start
      state["ref"] = jax.tree.map(jnp.copy, state["params"])
    ckpt = Checkpointer(os.path.join(wd, "checkpoints"), gc.keep)
    metrics_path = os.path.join(wd, "metrics.jsonl")
    start = 0
    if ckpt.latest_step() is not None:
      restored, position, meta = ckpt.restore({k: state[k] for k in SAVED})
      if meta["model_config"] != cfg.to_hf():
        raise ValueError(f"{wd}: its checkpoint holds a different model config; use a new "
                         "--workdir or the same model flags")
      state = dict(state, **restored)
      it.restore(position)
      start = int(state["step"])
      metrics_lib.truncate_jsonl(metrics_path, start)
      echo(f"resumed from step {start} ({ckpt.directory})")
    if start >= gc.steps:
      echo(f"nothing to do: checkpoint at step {start} >= --steps={gc.steps}")
      ckpt.close()
      last = metrics_lib.read_jsonl(metrics_path)
      return last[-1] if last else {"step": start}

    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    by_row = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    state_sh = jax.tree.map(lambda x: x.sharding if isinstance(
        getattr(x, "sharding", None), jax.sharding.NamedSharding) else rep, state)
    state = jax.device_put(state, state_sh)
    update_fn, ref_fn = _step_fns(graphdef, cfg, gc, sampling, tx, state_sh, rep)
    writer = metrics_lib.JsonlWriter(metrics_path)
    tb = (metrics_lib.EventFileWriter(os.path.join(wd, "tensorboard"))
          if gc.tensorboard else None)
    bar = metrics_lib.progress_bar(gc.steps, initial=start, enabled=gc.progress, unit="step")
    echo(f"GRPO from step {start} to {gc.steps}: {gc.prompts_per_step} prompts x G="
         f"{gc.group_size}, up to {gc.max_new_tokens} new tokens, {len(rows)} prompt rows, "
         f"rewards {weights}, mesh {dict(mesh.shape)}"
         + (f", LoRA rank {gc.lora_rank}" if lora else ", every weight trained"))
    last: dict[str, Any] = {}
    try:
      for step_no in range(start + 1, gc.steps + 1):
        t0 = time.perf_counter()
        idx = it.next_indices()
        position = it.state()
        policy = nnx.merge(graphdef, state["params"], state["frozen"], state["rest"])
        gen = Generation(policy, [prompt_ids[i] for i in idx], gc.max_new_tokens,
                         temperature=gc.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                         seed=rollout_seed(gc.seed, step_no), eos_id=eos,
                         num_samples=gc.group_size, return_logprobs=True,
                         record_routing=gc.routing_replay)
        gen.prefill()
        gen.decode()
        rollout = gen.arrays()
        del policy, gen
        t_sample = time.perf_counter() - t0
        picked = [rows[i] for i in idx]
        texts = [tokenizer.decode(t[:c]) for t, c in zip(rollout["tokens"], rollout["counts"])]
        prompts = [r["prompt"] for r in picked for _ in range(gc.group_size)]
        total, parts = rewards.score(fns, weights, prompts, texts,
                                     columns_of(picked, gc.group_size))
        t_reward = time.perf_counter() - t0 - t_sample
        batch = grpo_step.learner_batch(rollout, np.asarray(total, np.float32), gc.group_size,
                                        scale_rewards=gc.scale_rewards,
                                        routing_replay=gc.routing_replay)
        batch = jax.device_put(batch, by_row)
        t1 = time.perf_counter()
        if ref_fn is not None:
          batch["ref_logp"] = ref_fn(state, batch)
        logs = []
        for _ in range(gc.updates_per_batch):
          state, m = update_fn(state, batch)
          logs.append(m)
        state["step"] = jnp.asarray(step_no, jnp.int32)
        logs = jax.device_get(logs)
        t_learn = time.perf_counter() - t1
        rec = _record(step_no, logs, total, parts, rollout, gc, schedule, t_sample, t_reward,
                      t_learn, time.perf_counter() - t0)
        if not math.isfinite(rec["loss"]):
          ckpt.wait()
          raise FloatingPointError(f"GRPO loss is {rec['loss']} at step {step_no}: stopping; "
                                   f"the last good checkpoint is step {ckpt.latest_step()} in "
                                   f"{ckpt.directory}")
        if step_no % gc.log_every == 0 or step_no == gc.steps or step_no == start + 1:
          writer.write(rec)
          if tb:
            tb.scalars(step_no, rec)
          for i in range(min(gc.log_samples, len(texts))):
            echo(f"step {step_no} sample (reward {total[i]:.2f}): {prompts[i]!r} -> {texts[i]!r}")
          last = rec
        bar.set_postfix(reward=f"{rec['reward_mean']:.3f}", refresh=False)
        bar.update(step_no - bar.n)
        if step_no % gc.save_every == 0 or step_no == gc.steps:
          ckpt.save(step_no, {k: state[k] for k in SAVED}, position, cfg, run_meta(gc, cfg))
    finally:
      close_run(bar, ckpt, writer, tb)
  echo(f"step {last.get('step')}: reward {last.get('reward_mean', float('nan')):.4f}")
  return last


def _record(step_no, logs, total, parts, rollout, gc, schedule, t_sample, t_reward, t_learn,
            t_step) -> dict[str, Any]:
  """One metrics.jsonl row from a step's figures."""
  total = np.asarray(total, np.float64)
  counts = rollout["counts"].astype(np.float64)
  plen = np.repeat(rollout["prompt_lengths"], gc.group_size).astype(np.float64)
  groups = total.reshape(-1, gc.group_size)
  first, mean = logs[0], {k: float(np.mean([l[k] for l in logs])) for k in logs[0]}
  correct = [parts[n] for n in rewards.CORRECTNESS if n in parts]
  rec = {"step": step_no, "reward_mean": float(total.mean()), "reward_std": float(total.std()),
         "accuracy": float(np.mean(correct[0])) if correct else float("nan"),
         **{f"reward/{n}": float(np.mean(v)) for n, v in parts.items()},
         "loss": mean["loss"], "kl": mean["kl"], "clip_fraction": mean["clip_fraction"],
         "clip_fraction_first": float(first["clip_fraction"]),
         "ratio_max_dev": max(float(l["ratio_max_dev"]) for l in logs),
         "entropy": mean["entropy"], "grad_norm": mean["grad_norm"],
         "lr": float(schedule(step_no * gc.updates_per_batch - 1)),
         "response_length": float(counts.mean()), "response_length_max": float(counts.max()),
         "eos_fraction": float(np.mean(rollout["eos"])),
         "groups_with_signal": float(np.mean(groups.std(axis=1) > 0)),
         "sampler_tokens_per_s": float(counts.sum() / max(t_sample, 1e-9)),
         "learner_tokens_per_s": float(gc.updates_per_batch * (counts + plen).sum()
                                       / max(t_learn, 1e-9)),
         "sample_s": t_sample, "reward_s": t_reward, "learn_s": t_learn, "step_s": t_step,
         "time": time.time()}
  return rec
