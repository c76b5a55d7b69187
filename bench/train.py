"""Training throughput: our jitted train step against transformers + torch AdamW, same CPU, same config;
and the fraction of the machine's matmul rate our step reaches on a mid-size config.

Config: a tiny DeepSeek-V3 (hidden 256, 4 layers of which 3 MoE with 16 routed experts, top-4, one
shared expert, MLA; bench/peers/tiny_v3_bench.json, the config the MaxText and EasyDeL runs use
too), batch 4 x 256 tokens, float32, no MTP (transformers builds none) and no
balance loss (transformers computes none); ours still applies the bias balancing update. Torch
flushes denormals to zero as XLA does on CPU (without that, transformers' first AdamW steps take
about 12 s each on this machine, as Adam's second moments underflow). Each
side does a full optimizer step: forward, backward, global-norm clip 1.0, AdamW. MFU is tokens/s
x the config's training FLOPs per token over this machine's best float32 matmul rate, measured in
the same run. The script starts itself again with glibc's huge pages for large allocations, as our
training CLI does (`deepseek_jax.host_memory`; the tables say whether that was in effect);
transformers runs in the same process, under the same setting.

Mid-size (ours only; the MFU target): hidden 1024, 8 layers (1 dense), 32 routed experts top-4 of
width 512 plus one shared, MLA with 8 heads, vocab 8192, batch 4 x 512, float32 AdamW. Achieved
FLOP/s counts the model's useful training FLOPs (`DeepseekConfig.flops_per_token`: 6 x activated
matmul parameters + attention), not the work a dispatch path wastes.

  python bench/train.py [--quick] [--heads 4,8] [--no_mid]

--heads: the tiny config's attention heads, on both sides, one table per count (default 4 and 8:
the per-head cost of attention shows in the difference); --no_mid skips the mid-size config.
"""

from __future__ import annotations

import argparse
import json
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
from deepseek_jax import DeepseekConfig, dispatch, host_memory, optim
from deepseek_jax.model import DeepseekForCausalLM
from deepseek_jax.train_config import TrainConfig
from deepseek_jax.train_step import make_train_step

with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers",
                       "tiny_v3_bench.json")) as _f:
  _SHARED = json.load(_f)
B, T = _SHARED["batch_size"], _SHARED["seq_len"]
CFG = DeepseekConfig.from_hf(_SHARED["hf_config"])
MID_B, MID_T = 4, 512
MID = CFG.replace(
    vocab_size=8192, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
    num_hidden_layers=8, first_k_dense_replace=1, num_attention_heads=8, q_lora_rank=384,
    kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
    n_routed_experts=32, num_experts_per_tok=4, n_group=8, topk_group=4, n_shared_experts=1,
    max_position_embeddings=2048, original_max_position_embeddings=512)
TC = TrainConfig(learning_rate=1e-3, warmup_steps=0, mtp_weight=0.0, seq_aux_alpha=0.0,
                 bias_update_speed=0.001, clip_norm=1.0, weight_decay=0.1)


def ours(method: str, tokens: np.ndarray, base: DeepseekConfig = CFG):
  """A callable doing one of our optimizer steps per call (state carried between calls)."""
  cfg = base.replace(moe_dispatch=method)
  model = DeepseekForCausalLM(cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optim.make_optimizer(TC.optim_config())
  holder = {"s": {"params": params, "rest": rest, "opt_state": tx.init(params),
                  "step": jnp.zeros((), jnp.int32)}}
  step = jax.jit(make_train_step(graphdef, tx, cfg, TC), donate_argnums=(0,))
  batch = jnp.asarray(tokens[None])  # [1, B, T+1]
  del model

  def run():
    holder["s"], logs = step(holder["s"], batch)
    return logs["loss"]

  return run


def transformers_step(tokens: np.ndarray, cfg: DeepseekConfig = CFG):
  """One transformers forward/backward + clip + torch AdamW step per call."""
  import torch
  import transformers
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count())
  torch.set_flush_denormal(True)  # as XLA on CPU does; else early AdamW steps crawl (~12 s)
  model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**cfg.to_hf()))
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


def tiny(repeats: int, roof: dict, cfg: DeepseekConfig) -> tuple[list[str], list[list]]:
  """Ours (each dispatch) against transformers on the shared tiny config (`cfg`: its heads)."""
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T + 1)).astype(np.int32)
  default = dispatch.default_method()
  fns = {f"ours ({default} dispatch, the platform default)": ours(default, tokens, cfg),
         "ours (blocked dispatch)": ours("blocked", tokens, cfg),
         "ours (dense dispatch)": ours("dense", tokens, cfg),
         "transformers + torch AdamW": transformers_step(tokens, cfg)}
  sync = lambda x: jax.block_until_ready(x) if isinstance(x, jax.Array) else x  # noqa: E731
  secs = common.time_alternating(fns, repeats=repeats, warmup=2, sync=sync)
  flops_tok = cfg.flops_per_token(T, training=True)
  peer = secs["transformers + torch AdamW"]
  rows = []
  for name, s in secs.items():
    tps = B * T / s
    rows.append([name, s * 1e3, tps, peer / s, tps * flops_tok / (roof["gflops"] * 1e9)])
  md = [f"Tiny V3 (hidden 256, 4 layers, 16 experts top-4, 1 shared, MLA with "
        f"{cfg.num_attention_heads} heads), batch {B} x {T}, "
        f"float32, AdamW step; {flops_tok / 1e6:.1f} MFLOP per token (training).", "",
        common.table(["implementation", "ms / step", "tokens/s", "speed vs transformers", "MFU"],
                     rows)]
  return md, rows


def mid(repeats: int, roof: dict) -> tuple[list[str], list[list]]:
  """Ours on the mid-size config: achieved FLOP/s against the machine's matmul rate."""
  tokens = np.random.default_rng(0).integers(0, MID.vocab_size, (MID_B, MID_T + 1)).astype(
      np.int32)
  flops_tok = MID.flops_per_token(MID_T, training=True)
  rows = []
  # dense dispatch runs all 32 experts on every token: 8x the FLOPs
  for method in dict.fromkeys((dispatch.default_method(), "capacity")):
    fn = ours(method, tokens, MID)
    s = common.time_alternating({method: fn}, repeats=repeats, warmup=1,
                                sync=jax.block_until_ready)[method]
    del fn
    tps = MID_B * MID_T / s
    rows.append([f"ours ({method} dispatch)", s * 1e3, tps, tps * flops_tok / 1e9,
                 tps * flops_tok / (roof["gflops"] * 1e9)])
  md = [f"Mid-size V3 (hidden 1024, 8 layers, 32 experts top-4 of width 512 + 1 shared, MLA 8 "
        f"heads, vocab 8192; {MID.num_params() / 1e6:.0f}M parameters), batch {MID_B} x {MID_T}, "
        f"float32 AdamW; {flops_tok / 1e9:.2f} GFLOP per token (training). Target: 60% of the "
        "matmul roof.", "",
        common.table(["implementation", "ms / step", "tokens/s", "achieved GFLOP/s",
                      "fraction of matmul roof"], rows)]
  return md, rows


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--quick", action="store_true")
  p.add_argument("--heads", default=f"{CFG.num_attention_heads},8",
                 help="attention heads of the tiny config, comma-separated: a table each")
  p.add_argument("--no_mid", action="store_true", help="skip the mid-size config")
  args = p.parse_args()
  host_memory.reexec_with_huge_pages()  # as `deepseek_jax.train` starts
  roof = common.matmul_roof_gflops()
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  md = [f"Machine: {common.machine()['cpu']}, {os.cpu_count()} cores; best float32 matmul "
        f"{roof['gflops']:.0f} GFLOP/s {roof['shape']} (the MFU denominator). Both sides run in "
        f"one process with GLIBC_TUNABLES={tunables or '(unset)'} (transparent huge pages: "
        f"{host_memory.transparent_huge_pages()}), as `deepseek_jax.train` starts "
        "(`deepseek_jax.host_memory`).", ""]
  runs = []
  for h in dict.fromkeys(int(h) for h in args.heads.split(",")):
    cfg = CFG.replace(num_attention_heads=h, num_key_value_heads=h)
    tiny_md, rows = tiny(3 if args.quick else 7, roof, cfg)
    md += tiny_md + [""]
    runs.append({"heads": h, "flops_per_token": cfg.flops_per_token(T, training=True),
                 "rows": [dict(zip(["implementation", "ms", "tokens_per_s", "vs_transformers",
                                    "mfu"], r)) for r in rows]})
  mid_md, mid_rows = ([], []) if args.no_mid else mid(2 if args.quick else 3, roof)
  md += mid_md
  print("\n".join(md))
  rows = [[r["implementation"], r["ms"], r["tokens_per_s"]] for r in runs[0]["rows"]]
  common.save_result("train", {
      "machine": common.machine(), "versions": common.versions(), "roof": roof,
      "batch": [B, T], "tiny": runs, "glibc_tunables": tunables,
      "mid": [dict(zip(["implementation", "ms", "tokens_per_s", "gflops", "mfu"], r))
              for r in mid_rows],
      "markdown": "\n".join(md),
      "command": " ".join(["python bench/train.py"] + sys.argv[1:]),
      "chart": {"title": f"Training tokens/s, tiny V3 ({runs[0]['heads']} heads), batch "
                         f"{B}x{T}, float32 (CPU)",
                "labels": [r[0] for r in rows], "values": [r[2] for r in rows],
                "ylabel": "tokens/s"}})


if __name__ == "__main__":
  main()
