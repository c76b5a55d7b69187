"""`make demo`: train a tiny DeepSeek-V3 on the Python standard library, then let it write code.

On the CPU by default (a TPU or GPU is used when JAX finds one, with every local device in data
parallel). The model has the whole V3 architecture at toy size: MLA attention with low-rank q and
kv, DeepSeekMoE layers (8 routed experts, top-2 within 2 of 4 groups, 1 shared expert,
auxiliary-loss-free balancing) after one dense layer, and one MTP depth. Text is UTF-8 bytes
(the built-in byte tokenizer). The run prints the loss at the start and the end, saves a
checkpoint, reloads it, and completes `def fibonacci(n):` with `deepseek_jax.generate`
(sampled at temperature 0.7 from the 20 likeliest bytes, fixed seed: a model this small trained
for minutes falls into runs of spaces when decoded greedily).
"""

from __future__ import annotations

import os
import sysconfig
import tempfile
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from deepseek_jax import cli, metrics
from deepseek_jax.generation import generate
from deepseek_jax.presets import get_preset
from deepseek_jax.pretrained import from_pretrained
from deepseek_jax.tokenizer import ByteTokenizer
from deepseek_jax.train_config import TrainConfig
from deepseek_jax.trainer import train
from deepseek_jax.workdir import clear_demo_workdir

PROMPT = "def fibonacci(n):"

# Standard-library directories left out: tests, generated tables and third-party packages.
STDLIB_EXCLUDE = ("__pycache__", ".*", "site-packages", "dist-packages", "test", "tests",
                  "idlelib", "encodings", "pydoc_data", "lib2to3", "turtledemo", "config-*")

# Tiny DeepSeek-V3: byte vocabulary (ids 256/257/258 are bos/eos/pad, 264 rounds up to 8).
DEMO_CONFIG = get_preset("tiny_v3").replace(
    vocab_size=264, bos_token_id=256, eos_token_id=257, pad_token_id=258,
    hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=4,
    num_attention_heads=4, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=16,
    qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=8, n_shared_experts=1,
    num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
    rope_type="default", max_position_embeddings=512)

flags.DEFINE_integer("steps", 600, "Training steps (about 3 minutes on 2 CPU cores).",
                     lower_bound=1)
flags.DEFINE_integer("seq_len", 128, "Bytes per training sequence.", lower_bound=1)
flags.DEFINE_integer("batch_per_device", 16, "Sequences per step on each device.",
                     lower_bound=1)
flags.DEFINE_integer("max_corpus_mb", 4, "Cap on the corpus size (MB of source).",
                     lower_bound=1)
flags.DEFINE_integer("new_tokens", 160, "Bytes to generate after the prompt.",
                     lower_bound=1)
flags.DEFINE_string("workdir", os.path.join(tempfile.gettempdir(), "deepseek_jax_demo"),
                    "Where the checkpoint, metrics.jsonl and data cache go: a new or empty "
                    "directory, or an earlier demo's (emptied first).")
FLAGS = flags.FLAGS


def stdlib_dir() -> str:
  return sysconfig.get_paths()["stdlib"]


# What a demo run writes in its workdir: the only entries the demo removes when it starts again.
DEMO_ENTRIES = frozenset({"config.json", "checkpoints", "metrics.jsonl", "tensorboard", "data",
                          "byte_tokenizer.json"})


def clear_workdir(workdir: str) -> None:
  """Empties an earlier demo's workdir; refuses (ValueError) one holding anything else."""
  clear_demo_workdir(workdir, DEMO_ENTRIES, "demo")


def run_demo(workdir: str, *, steps: int = 600, seq_len: int = 128, batch_per_device: int = 16,
             max_corpus_mb: int = 4, new_tokens: int = 160) -> dict:
  """Trains the demo model in `workdir` (an earlier demo's is emptied first; any other non-empty
  directory is refused), prints losses and a completion."""

  workdir = os.path.abspath(workdir)
  clear_workdir(workdir)
  os.makedirs(workdir)
  config_path = DEMO_CONFIG.save(workdir)
  n_dev = jax.local_device_count()
  print(f"deepseek-jax demo: tiny DeepSeek-V3 ({DEMO_CONFIG.num_params(include_mtp=True):,} "
        f"parameters: MLA, 8-expert MoE + shared expert, MTP) on {n_dev} "
        f"{jax.default_backend().upper()} device(s); corpus: the standard library in "
        f"{stdlib_dir()}", flush=True)
  tc = TrainConfig(
      config_json=config_path, data=stdlib_dir(), data_patterns=("*.py",),
      data_exclude=STDLIB_EXCLUDE, max_data_bytes=max_corpus_mb << 20, tokenizer="byte",
      seq_len=seq_len, batch_size=batch_per_device * n_dev, steps=steps, learning_rate=3e-3,
      warmup_steps=min(50, steps // 10), workdir=workdir, save_every=steps, keep=1,
      log_every=max(1, steps // 20), mtp_weight=0.3, bias_update_speed=0.001,
      seq_aux_alpha=1e-4)
  t0 = time.time()
  last = train(tc)
  elapsed = time.time() - t0
  recs = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  first = recs[0]
  print(f"\ntrained {last['step']} steps in {elapsed:.0f} s "
        f"({last['tokens_per_s']:,.0f} tokens/s at the end)")
  print(f"loss at the start: {first['loss']:.3f} (step {first['step']}); at the end: "
        f"{last['loss']:.3f} (step {last['step']}); MTP loss {first['mtp_loss']:.3f} -> "
        f"{last['mtp_loss']:.3f}; expert-load CV {last.get('load_cv_mean', float('nan')):.2f}")
  print(f"checkpoint: {os.path.join(workdir, 'checkpoints', str(last['step']))}\n"
        f"generate from it: python -m deepseek_jax.generate_text --model_dir={workdir} "
        f"--prompt='{PROMPT}' --temperature=0.7 --top_k=20")

  model = from_pretrained(workdir, dtype=jnp.float32)  # read back from the checkpoint
  tok = ByteTokenizer()
  out = generate(model, [tok.encode(PROMPT)], new_tokens, temperature=0.7, top_k=20, seed=0,
                 eos_id=tok.eos_id)[0]
  print("\ncompletion (deepseek_jax.generation.generate, temperature 0.7, top-k 20):\n" + "-" * 60)
  print((PROMPT + tok.decode(out)).rstrip())
  print("-" * 60)
  return {"first_loss": first["loss"], "last_loss": last["loss"], "seconds": elapsed,
          "completion": tok.decode(out)}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run_demo(FLAGS.workdir, steps=FLAGS.steps, seq_len=FLAGS.seq_len,
           batch_per_device=FLAGS.batch_per_device, max_corpus_mb=FLAGS.max_corpus_mb,
           new_tokens=FLAGS.new_tokens)


if __name__ == "__main__":
  cli.run(main)
