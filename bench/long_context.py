"""Long-context decode: ours (absorbed MLA over the latent cache, jitted while_loop) against
transformers on the same CPU, the same float32 weights, torch on 2 threads, at 2K, 8K and 32K
tokens of context, batch 1 and 8. transformers 5.23 caches the same latent (c_kv and the rope key,
as single-head tensors in its DynamicCache) but expands every head's keys and values from the
whole cache at every step (`expand_kv`: kv_b_proj over all S cached tokens); the absorbed path
folds W_uk into the query and W_uv after the weighted sum, and reads only the latent.

  python bench/long_context.py [--quick] [--contexts 2048,8192,32768] [--batches 1,8]
  python bench/long_context.py --profile_step --contexts 8192 --batches 1 [--scan_layers] [--layers 4]

--profile_step (ours only): one jitted decode step (`model.forward` over the cache, absorbed, the
cache donated as the decode loop donates its carry) at each context and batch: its time, XLA's
cost analysis (FLOPs, bytes accessed) beside the cache's own bytes, and the ops of the optimized
HLO whose result is as large as one layer's latent or rope-key cache, or with --scan_layers as a
layer stack's (tests/hlo_ops.py: an in-place update per array is the floor; copies and
transposes are what issue 17 removed). --scan_layers runs the layers as stacks under a scan
(`DeepseekConfig.scan_layers`); --layers sets their number (the first stays dense).

What is timed: `new - 1` greedy one-token decode steps after a cache of `context` tokens (ours:
the jitted decode loop; theirs: forwards through its DynamicCache, what `generate` does minus its
bookkeeping). Decode tokens/s = batch * (new - 1) / that time; medians of the two sides run in
turn after a warm-up (our compilation excluded).

How the caches are filled: with random values of the right shapes, on both sides, not by a
prefill. A decode step's cost depends on the cache's length, not its values (the routed experts'
choice depends on the hidden states, which differ between two random caches anyway), and a
prefill of 8 x 32K tokens through transformers' expanded attention would take this machine's
memory and most of an hour. Ours: a one-token prompt prefilled into a cache of context + new
slots, then its latents replaced and every sequence placed at position `context`; theirs: each
layer's latent [B, 1, S, kv_lora_rank] and rope key [B, 1, S, rope] handed to
`DynamicCache.update`, as its attention does.

Cache bytes: what each side holds (ours: the latent and rope key per token per layer, with the
slots for the new tokens preallocated; theirs: the same per token, grown by concatenation). The
config keeps DeepSeek-V3's attention widths (kv_lora_rank 512, rope 64, nope 128, v 128) on a
small body (hidden 512, 8 heads, 2 layers: one dense, one MoE with 32 experts top-4). Rows whose
per-step expansion on transformers' side would not fit in memory here (8 x 32K: keys and values
of every head, 2.5 GiB per layer per step) are listed as skipped, with the reason.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.join(_ROOT, "tests"))  # hf_reference: the transformers models
# Torch's OpenMP workers otherwise spin after each call and slow the JAX side that follows them
# in the alternating timing (as in bench/train.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from deepseek_jax import generation, get_preset
from deepseek_jax.pretrained import from_pretrained

CFG = get_preset("tiny_v3").replace(
    vocab_size=4096, hidden_size=512, intermediate_size=1408, moe_intermediate_size=256,
    num_hidden_layers=2, num_attention_heads=8, q_lora_rank=256, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=32,
    n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1,
    max_position_embeddings=40960, original_max_position_embeddings=40960, rope_type="default",
    num_nextn_predict_layers=0)
# transformers' per-step expansion (bytes) above which its side is skipped on this machine
THEIRS_MAX_EXPANDED_BYTES = 2 * 2**30


def theirs_expanded_bytes(batch: int, context: int) -> int:
  """Keys and values of every head that transformers expands from its cache per layer per step."""
  h = CFG.num_attention_heads
  return batch * context * h * (CFG.qk_head_dim + CFG.v_head_dim) * 4


class Ours:
  """Our decode loop from a random latent cache of `context` tokens (see the module docstring)."""

  def __init__(self, model, batch: int, context: int, new: int):
    self.g = generation.Generation(model, np.ones((batch, 1), np.int32), new, eos_id=-1,
                                   max_len=context + new)
    self.g.prefill()  # a one-token prompt: sets up the carry (and compiles the prefill)
    rng = np.random.RandomState(0)
    cache = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape).astype(a.dtype)),
                         self.g.carry.cache)
    self.base = self.g.carry._replace(cache=cache, pos=jnp.full((batch,), context, jnp.int32))
    self.cache_bytes = generation.cache_bytes(cache)

  def run(self) -> float:
    self.g.carry = jax.tree.map(jnp.copy, self.base)  # the loop donates its carry
    jax.block_until_ready(self.g.carry)
    t0 = time.perf_counter()
    self.g.decode()
    return time.perf_counter() - t0


class Theirs:
  """transformers' decode steps through a DynamicCache of `context` random tokens."""

  def __init__(self, hf, batch: int, context: int, new: int):
    import torch
    from transformers import DynamicCache
    self.hf, self.new, self.context = hf, new, context
    g = torch.Generator().manual_seed(0)
    self.cache = DynamicCache(config=hf.config)
    for layer in range(hf.config.num_hidden_layers):
      self.cache.update(torch.randn(batch, 1, context, CFG.kv_lora_rank, generator=g),
                        torch.randn(batch, 1, context, CFG.qk_rope_head_dim, generator=g), layer)
    self.cache_bytes = sum(t.nelement() * t.element_size() for layer in self.cache.layers
                           for t in (layer.keys, layer.values))
    self.tok = torch.ones((batch, 1), dtype=torch.long)

  def run(self) -> float:
    import torch
    extra = self.cache.get_seq_length() - self.context  # what the previous run appended
    if extra:
      self.cache.crop(-extra)  # this transformers crops by a negative count of tokens
    tok = self.tok
    with torch.no_grad():
      t0 = time.perf_counter()
      for _ in range(self.new - 1):
        out = self.hf(tok, past_key_values=self.cache, use_cache=True)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
      return time.perf_counter() - t0


def measure(model, hf, batch: int, context: int, new: int, repeats: int) -> dict:
  ours = Ours(model, batch, context, new)
  ours.run()  # compiles the decode loop
  sides = {"ours": ours}
  skip = None
  if theirs_expanded_bytes(batch, context) > THEIRS_MAX_EXPANDED_BYTES:
    skip = (f"transformers would expand {theirs_expanded_bytes(batch, context) / 2**30:.1f} GiB "
            f"of keys and values per layer per step (limit here "
            f"{THEIRS_MAX_EXPANDED_BYTES / 2**30:.0f} GiB)")
  else:
    sides["theirs"] = Theirs(hf, batch, context, new)
    sides["theirs"].run()  # warm-up
  times = {k: [] for k in sides}
  for _ in range(repeats):
    for k, side in sides.items():
      times[k].append(side.run())
  out = {"batch": batch, "context": context, "skip": skip}
  for k, side in sides.items():
    sec = statistics.median(times[k])
    out[k] = {"decode_s": sec, "decode_tps": batch * (new - 1) / sec,
              "cache_bytes": side.cache_bytes}
  return out


def profile_step(model, batch: int, context: int, repeats: int) -> list:
  """[context, batch, ms per step, MFLOP, MB accessed, cache MB, whole-cache ops] of one jitted
  decode step, its cache donated as in the decode loop (see the module docstring)."""
  from flax import nnx
  from hlo_ops import whole_cache_ops
  graphdef, state = nnx.split(model)
  rng = np.random.RandomState(0)
  cache = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape).astype(a.dtype)),
                       model.init_cache(batch, context + 16))
  tok = jnp.ones((batch, 1), jnp.int32)
  pos = jnp.full((batch, 1), context, jnp.int32)

  @functools.partial(jax.jit, donate_argnums=1)
  def step(state, cache, tok, pos):
    out = nnx.merge(graphdef, state).forward(tok, positions=pos, cache=cache, absorb=True,
                                             with_mtp=False)
    return out.logits, out.cache

  compiled = step.lower(state, cache, tok, pos).compile()
  _, cache = jax.block_until_ready(compiled(state, cache, tok, pos))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    _, cache = jax.block_until_ready(compiled(state, cache, tok, pos))
    times.append(time.perf_counter() - t0)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  one_layer = {batch * (context + 16) * w for w in (CFG.kv_lora_rank, CFG.qk_rope_head_dim)}
  stacks = {1}  # layers per stack: a stack's cache array is that many layers' arrays
  if model.cfg.scan_layers:
    stacks = {s.input_layernorm.scale.shape[0] for s in model.stacks()}
  ops = whole_cache_ops(compiled.as_text(), {n * a for n in stacks for a in one_layer})
  cache_mb = generation.cache_bytes(cache) / 1e6
  return [context, batch, statistics.median(times) * 1e3, cost.get("flops", 0) / 1e6,
          cost.get("bytes accessed", 0) / 1e6, cache_mb,
          ", ".join(f"{n} {k}" for k, n in sorted(ops.items()))]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true", help="2K and 8K, one timed run each")
  ap.add_argument("--contexts", default="2048,8192,32768")
  ap.add_argument("--batches", default="1,8")
  ap.add_argument("--new", type=int, default=9, help="tokens per run (new - 1 timed steps)")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--profile_step", action="store_true", help="ours only: one step's profile")
  ap.add_argument("--scan_layers", action="store_true", help="ours: the layers as scanned stacks")
  ap.add_argument("--layers", type=int, default=CFG.num_hidden_layers,
                  help="decoder layers (the first dense, the rest MoE)")
  args = ap.parse_args()
  if args.quick:
    args.contexts, args.repeats = "2048,8192", 1
  import torch
  torch.set_num_threads(2)
  from hf_reference import save_hf  # noqa: E402
  with tempfile.TemporaryDirectory() as d:
    hf = save_hf(CFG.replace(num_hidden_layers=args.layers), d, seed=0)
    hf.config.use_cache = True
    model = from_pretrained(d, dtype=jnp.float32, scan_layers=args.scan_layers)
  if args.profile_step:
    prof = [profile_step(model, int(b), int(c), args.repeats) for c in args.contexts.split(",")
            for b in args.batches.split(",")]
    print(common.table(["context", "batch", "ms per step", "MFLOP", "MB accessed (XLA)",
                        "cache MB", "ops producing a whole layer's (or stack's) cache array"],
                       prof))
    return
  rows, runs = [], []
  for context in (int(c) for c in args.contexts.split(",")):
    for batch in (int(b) for b in args.batches.split(",")):
      r = measure(model, hf, batch, context, args.new, args.repeats)
      runs.append(r)
      a, b = r["ours"], r.get("theirs")
      rows.append([context, batch, a["decode_tps"], b["decode_tps"] if b else "skipped",
                   f"{a['decode_tps'] / b['decode_tps']:.2f}x" if b else "-",
                   a["cache_bytes"] / 2**20, b["cache_bytes"] / 2**20 if b else "-",
                   r["skip"] or ""])
      print(f"context {context} batch {batch}: {rows[-1]}", file=sys.stderr, flush=True)
  print(f"config: hidden {CFG.hidden_size}, {args.layers} layers"
        f"{' (scanned)' if args.scan_layers else ''}, "
        f"{CFG.num_attention_heads} heads, kv_lora_rank {CFG.kv_lora_rank}, rope "
        f"{CFG.qk_rope_head_dim}, nope {CFG.qk_nope_head_dim}, v {CFG.v_head_dim}, "
        f"{CFG.n_routed_experts} experts top-{CFG.num_experts_per_tok}; {args.new - 1} timed "
        f"decode steps, medians of {args.repeats}; caches filled with random values (see the "
        f"script's docstring); machine {common.machine()}")
  print()
  print(common.table(["context", "batch", "decode tok/s ours", "decode tok/s HF", "ratio",
                      "cache MiB ours", "cache MiB HF", "note"], rows))
  common.save_result("long_context", {"runs": runs, "rows": rows,
                                      "command": " ".join(["python bench/long_context.py"]
                                                          + sys.argv[1:])})


if __name__ == "__main__":
  main()
