"""GRPO step time: ours (`grpo_trainer.run`) against TRL's `GRPOTrainer` (transformers'
DeepseekV3ForCausalLM in eager PyTorch) on the same CPU, config, task, group size and completion
length.

Config: the GRPO demo's tiny DeepSeek-V3 (`grpo_demo.GRPO_DEMO_CONFIG`: hidden 128, 3 layers,
8 routed experts top-2 + 1 shared, MLA, 264-token byte vocabulary; transformers gets it through
`to_hf`), each side from its own random initialisation. Task: two-digit addition prompts (raw
text), the math reward, G = 8 samples of each of 8 prompts per step (64 completions), up to 16
new tokens each (TRL is held to exactly 16 with `min_new_tokens`; ours stops a row at EOS, which a
random model emits about once in 264 tokens, and its decode loop runs until every row is done, so
it too runs 16 steps), temperature 1, β = 0, one policy update per batch. Each side runs in its own process; a step is sampling, scoring and
the update; the figure is the median of the timed steps after the warm-up ones (compilation on
our side).

  python bench/grpo.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bench import common  # noqa: E402

G, PROMPTS, NEW = 8, 8, 16
WARMUP = 2


def _prompt_rows(n: int) -> list[dict]:
  from deepseek_jax import tasks
  return tasks.addition_rows(n, digits=2, seed=0)


def _ours(steps: int, work: str) -> dict:
  from deepseek_jax import grpo_trainer, metrics, tasks
  from deepseek_jax.grpo_config import GRPOConfig
  from deepseek_jax.grpo_demo import GRPO_DEMO_CONFIG

  cfg = GRPO_DEMO_CONFIG.replace(moe_dispatch="blocked")
  cfg_path = cfg.save(work)
  prompts = tasks.write_jsonl(os.path.join(work, "prompts.jsonl"), _prompt_rows(256))
  gc = GRPOConfig(config_json=cfg_path, prompts=prompts, prompt_format="raw", tokenizer="byte",
                  reward=("math",), group_size=G, prompts_per_step=PROMPTS, max_new_tokens=NEW,
                  steps=steps + WARMUP, beta=0.0, learning_rate=1e-5, workdir=os.path.join(
                      work, "run"), save_every=10_000, log_samples=0, progress=False,
                  tensorboard=False)
  grpo_trainer.run(gc, echo=lambda m: None)
  rows = metrics.read_jsonl(os.path.join(work, "run", "metrics.jsonl"))[WARMUP:]
  return {"seconds": statistics.median(r["step_s"] for r in rows),
          "sample_s": statistics.median(r["sample_s"] for r in rows),
          "learn_s": statistics.median(r["learn_s"] for r in rows),
          "new_tokens": statistics.median(r["response_length"] for r in rows), "steps": len(rows)}


def _byte_tokenizer():
  """A transformers tokenizer over the same 256 bytes + bos/eos/pad (ids 256-258) as ours."""
  import tokenizers
  import transformers
  alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet(),
                    key=lambda c: _BYTE_OF[c])
  vocab = {c: i for i, c in enumerate(alphabet)}
  vocab.update({"<bos>": 256, "<eos>": 257, "<pad>": 258})
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                          use_regex=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>",
                                              eos_token="<eos>", pad_token="<pad>")


def _bytes_to_unicode() -> dict[str, int]:
  """GPT-2's byte-to-character table, inverted: character -> byte."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
      range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_OF = _bytes_to_unicode()


def _trl(steps: int, work: str) -> dict:
  import datasets
  import torch
  import transformers
  import trl

  from deepseek_jax import rewards
  from deepseek_jax.grpo_demo import GRPO_DEMO_CONFIG

  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count())
  cfg = GRPO_DEMO_CONFIG
  model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**cfg.to_hf()))
  model = model.float().train()
  tok = _byte_tokenizer()
  rows = _prompt_rows(256)
  data = datasets.Dataset.from_list(rows)
  stamps: list[float] = []

  class Clock(transformers.TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
      stamps.append(time.perf_counter())

  def math(prompts, completions, answer, **_):
    return rewards.math_reward(prompts, completions, answer=answer)

  args = trl.GRPOConfig(
      output_dir=os.path.join(work, "trl"), per_device_train_batch_size=G * PROMPTS,
      num_generations=G, max_completion_length=NEW, max_steps=steps + WARMUP,
      learning_rate=1e-5, beta=0.0, temperature=1.0, logging_steps=1, report_to="none",
      use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True,
      generation_kwargs={"min_new_tokens": NEW}, dataloader_num_workers=0)
  trainer = trl.GRPOTrainer(model=model, reward_funcs=[math], args=args, train_dataset=data,
                            processing_class=tok, callbacks=[Clock()])
  t0 = time.perf_counter()
  trainer.train()
  times = [b - a for a, b in zip([t0] + stamps[:-1], stamps)][WARMUP:]
  lengths = [h["completions/mean_length"] for h in trainer.state.log_history
             if "completions/mean_length" in h][WARMUP:]
  return {"seconds": statistics.median(times), "steps": len(times),
          "new_tokens": statistics.median(lengths) if lengths else None,
          "trl": trl.__version__}


def _child(side: str, steps: int) -> None:
  with tempfile.TemporaryDirectory() as work:
    out = _trl(steps, work) if side == "trl" else _ours(steps, work)
  print("RESULT " + json.dumps(out), flush=True)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--quick", action="store_true")
  p.add_argument("--child", choices=("ours", "trl"))
  p.add_argument("--steps", type=int, default=5)
  args = p.parse_args()
  if args.child:
    return _child(args.child, args.steps)
  steps = 2 if args.quick else args.steps
  results, failed = {}, {}
  for side in ("ours", "trl"):
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", side,
                        f"--steps={steps}"], capture_output=True, text=True, timeout=1800,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if r.returncode or line is None:
      failed[side] = (r.stderr or r.stdout)[-1500:]
      continue
    results[side] = json.loads(line[len("RESULT "):])
  names = {"ours": "ours (deepseek_jax.grpo_trainer)", "trl": "TRL GRPOTrainer (transformers)"}
  rows = [[names[s], r["seconds"], G * PROMPTS / r["seconds"], r["new_tokens"]]
          for s, r in results.items()]
  md = [f"GRPO demo config (tiny V3), {PROMPTS} prompts x G={G}, {NEW} new tokens each, "
        f"beta 0, one update per batch; median of {steps} steps after {WARMUP} warm-up steps, "
        "each side in its own process.", "",
        common.table(["implementation", "s / GRPO step", "completions/s", "new tokens"], rows)]
  if len(results) == 2:
    ratio = results["trl"]["seconds"] / results["ours"]["seconds"]
    md += ["", f"Ours over TRL: {ratio:.2f}x (seconds per GRPO step)."]
  for s, err in failed.items():
    md += ["", f"{names[s]}: did not run here: "
           f"{err.strip().splitlines()[-1] if err.strip() else '?'}"]
  print("\n".join(md))
  common.save_result("grpo", {
      "machine": common.machine(), "versions": common.versions(), "results": results,
      "failed": failed, "markdown": "\n".join(md),
      "chart": {"title": "GRPO completions/s, tiny V3, 8 prompts x 8 (CPU)",
                "labels": [r[0] for r in rows], "values": [r[2] for r in rows],
                "ylabel": "completions/s"}})


if __name__ == "__main__":
  main()
