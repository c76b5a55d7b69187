"""Training throughput: our jitted train step against transformers + torch AdamW, same CPU, same config.

Config: a tiny DeepSeek-V3 (hidden 256, 4 layers of which 3 MoE with 16 routed experts, top-4, one
shared expert, MLA), batch 4 x 256 tokens, float32, no MTP (transformers builds none) and no
balance loss (transformers computes none); ours still applies the bias balancing update. Torch
flushes denormals to zero as XLA does on CPU (without that, transformers' first AdamW steps take
about 12 s each on this machine, as Adam's second moments underflow). Each
side does a full optimizer step: forward, backward, global-norm clip 1.0, AdamW. MFU is tokens/s
x the config's training FLOPs per token over this machine's best float32 matmul rate, measured in
the same run.

  python bench/train.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Torch's OpenMP workers otherwise spin after each call and slow the JAX step that follows them
# in the alternating timing (seen: ours 330 ms a step alternating vs 217 ms alone).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench import common
from deepseek_jax import get_preset, optim, trainer
from deepseek_jax.model import DeepseekForCausalLM

B, T = 4, 256
CFG = get_preset("tiny_v3").replace(
    vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
    num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=128,
    kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
    n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1,
    num_nextn_predict_layers=0, max_position_embeddings=1024,
    original_max_position_embeddings=256)
TC = trainer.TrainConfig(learning_rate=1e-3, warmup_steps=0, mtp_weight=0.0, seq_aux_alpha=0.0,
                         bias_update_speed=0.001, clip_norm=1.0, weight_decay=0.1)


def ours(method: str, tokens: np.ndarray):
  """A callable doing one of our optimizer steps per call (state carried between calls)."""
  cfg = CFG.replace(moe_dispatch=method)
  model = DeepseekForCausalLM(cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optim.make_optimizer(TC.optim_config())
  holder = {"s": {"params": params, "rest": rest, "opt_state": tx.init(params),
                  "step": jnp.zeros((), jnp.int32)}}
  step = jax.jit(trainer.make_train_step(graphdef, tx, cfg, TC), donate_argnums=(0,))
  batch = jnp.asarray(tokens[None])  # [1, B, T+1]

  def run():
    holder["s"], logs = step(holder["s"], batch)
    return logs["loss"]

  return run


def transformers_step(tokens: np.ndarray):
  """One transformers forward/backward + clip + torch AdamW step per call."""
  import torch
  import transformers
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count())
  torch.set_flush_denormal(True)  # as XLA on CPU does; else early AdamW steps crawl (~12 s)
  model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**CFG.to_hf()))
  model = model.float().train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
  ids = torch.from_numpy(tokens[:, :-1].astype(np.int64))

  def run():
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()

  return run


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--quick", action="store_true")
  args = p.parse_args()
  tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (B, T + 1)).astype(np.int32)
  fns = {"ours (blocked dispatch, CPU default)": ours("blocked", tokens),
         "ours (dense dispatch)": ours("dense", tokens),
         "transformers + torch AdamW": transformers_step(tokens)}
  sync = lambda x: jax.block_until_ready(x) if isinstance(x, jax.Array) else x
  secs = common.time_alternating(fns, repeats=3 if args.quick else 7, warmup=2, sync=sync)
  roof = common.matmul_roof_gflops()
  flops_tok = CFG.flops_per_token(T, training=True)
  peer = secs["transformers + torch AdamW"]
  rows = []
  for name, s in secs.items():
    tps = B * T / s
    rows.append([name, s * 1e3, tps, peer / s, tps * flops_tok / (roof["gflops"] * 1e9)])
  md = [f"Tiny V3 (hidden 256, 4 layers, 16 experts top-4, 1 shared, MLA), batch {B} x {T}, "
        f"float32, AdamW step; {flops_tok / 1e6:.1f} MFLOP per token (training). Machine: "
        f"{common.machine()['cpu']}, {os.cpu_count()} cores; best float32 matmul "
        f"{roof['gflops']:.0f} GFLOP/s {roof['shape']} (the MFU denominator).", "",
        common.table(["implementation", "ms / step", "tokens/s", "speed vs transformers", "MFU"],
                     rows)]
  print("\n".join(md))
  common.save_result("train", {
      "machine": common.machine(), "versions": common.versions(), "roof": roof,
      "flops_per_token": flops_tok, "batch": [B, T],
      "rows": [dict(zip(["implementation", "ms", "tokens_per_s", "vs_transformers", "mfu"], r))
               for r in rows],
      "markdown": "\n".join(md),
      "chart": {"title": f"Training tokens/s, tiny V3, batch {B}x{T}, float32 (CPU)",
                "labels": [r[0] for r in rows], "values": [r[2] for r in rows],
                "ylabel": "tokens/s"}})


if __name__ == "__main__":
  main()
