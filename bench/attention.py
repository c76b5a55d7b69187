"""Attention's per-head cost in training and prefill: our expanded MLA attention forward+backward
against PyTorch's fused scaled-dot-product attention (transformers' path) on the same shapes and
CPU, across head counts, in one alternating run.

  python bench/attention.py [--heads 4,8,16] [--repeats 7]

Each side, from the latent c_kv [B, S, C], the shared rope key k_pe [B, S, R] and the queries
q_nope [B, T, H, N], q_pe [B, T, H, R]: every head's keys and values expanded by kv_b_proj, causal
softmax attention, output [B, T, H, V]; then the backward to all four inputs and the kv_b_proj
weight (loss: sum of sin of the output).
  ours            `MLAttention.attend_expanded` as the model calls it without a cache: heads
                  leading, queries by blocks that read only the keys up to their last query
                  (`attention._query_blocks`; 4 blocks of 64 at T = 256)
  ours, 1 block   the formulation before that (one score product over [nope ; rope] in
                  [B, T, H, ·] layout, the whole [B, H, T, S] softmax at once)
  torch SDPA      `F.scaled_dot_product_attention(is_causal=True)` on [nope ; rope] keys, as
                  transformers' DeepseekV3Attention with its default "sdpa" implementation
Shapes: tiny V3 of bench/train.py (batch 4 x 256, kv_lora_rank 128, nope 32, rope 16, v 32),
float32. The per-head column is (time at H - time at the smallest H) / (H - smallest H).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch's idle workers must not spin

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench import common
from deepseek_jax import get_preset
from deepseek_jax.attention import MLAttention, attention_mask

B, T, C, N, R, V = 4, 256, 128, 32, 16, 32


def _inputs(h: int):
  r = np.random.RandomState(0)
  return [r.randn(*s).astype(np.float32) for s in ((B, T, h, N), (B, T, h, R), (B, T, C),
                                                     (B, T, R))]


def ours(h: int, one_block: bool):
  cfg = get_preset("tiny_v3").replace(num_attention_heads=h, kv_lora_rank=C, qk_nope_head_dim=N,
                                      qk_rope_head_dim=R, v_head_dim=V)
  attn = MLAttention(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(attn)
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  mask = attention_mask(pos, pos)

  def old(m, q_nope, q_pe, c_kv, k_pe):  # one block, [B, T, H, ·] layout
    kv = m.kv_b_proj(c_kv).reshape(B, T, h, N + V)
    k_nope, v = kv[..., :N], kv[..., N:]
    q = jnp.concatenate([q_nope, q_pe], axis=-1)
    k = jnp.concatenate([k_nope, jnp.broadcast_to(k_pe[:, :, None], (B, T, h, R))], axis=-1)
    probs = m._softmax(jnp.einsum("bthd,bshd->bhts", q, k), mask)
    return jnp.einsum("bhts,bshv->bthv", probs, v)

  def loss(state, *xs):
    m = nnx.merge(graphdef, state)
    out = old(m, *xs) if one_block else m.attend_expanded(*xs, mask, causal=True)
    return jnp.sum(jnp.sin(out))

  step = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
  xs = [jnp.asarray(a) for a in _inputs(h)]
  return lambda: step(state, *xs)


def torch_sdpa(h: int):
  import torch
  import torch.nn.functional as F
  torch.set_num_threads(os.cpu_count())
  q_nope, q_pe, c_kv, k_pe = (torch.from_numpy(a).requires_grad_() for a in _inputs(h))
  w = torch.nn.Linear(C, h * (N + V), bias=False)

  def run():
    kv = w(c_kv).view(B, T, h, N + V).transpose(1, 2)                      # [B, H, S, N+V]
    k_nope, v = kv[..., :N], kv[..., N:]
    k = torch.cat([k_nope, k_pe[:, None].expand(B, h, T, R)], -1)
    q = torch.cat([q_nope, q_pe], -1).transpose(1, 2)                       # [B, H, T, N+R]
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=(N + R) ** -0.5)
    torch.sin(out).sum().backward()
    for t in (q_nope, q_pe, c_kv, k_pe, w.weight):
      t.grad = None
  return run


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--heads", default="4,8,16")
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--quick", action="store_true", help="heads 4,8; 3 runs")
  args = ap.parse_args()
  if args.quick:
    args.heads, args.repeats = "4,8", 3
  heads = [int(h) for h in args.heads.split(",")]
  times = {}
  for h in heads:
    calls = {"ours": ours(h, False), "ours, 1 block": ours(h, True), "torch SDPA": torch_sdpa(h)}
    sync = lambda x: jax.block_until_ready(x) if not callable(x) else x  # noqa: E731
    times[h] = common.time_alternating(calls, repeats=args.repeats, sync=sync)
  rows = []
  for h in heads:
    for side, sec in times[h].items():
      base = times[heads[0]][side]
      per = (sec - base) / (h - heads[0]) * 1e3 if h != heads[0] else ""
      rows.append([h, side, sec * 1e3, per, sec / times[h]["torch SDPA"]])
  print(f"batch {B} x {T}, kv_lora_rank {C}, nope {N}, rope {R}, v {V}, float32, "
        f"forward+backward, medians of {args.repeats}; machine {common.machine()}")
  print()
  print(common.table(["heads", "side", "ms", "ms per added head", "x torch SDPA"], rows))
  common.save_result("attention", {"rows": rows, "command": " ".join(
      ["python bench/attention.py"] + sys.argv[1:])})


if __name__ == "__main__":
  main()
