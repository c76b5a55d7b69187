"""Generation speed: ours (jitted prefill + while_loop decode over the latent cache) against
transformers' `generate` on the same CPU, the same float32 weights, torch on 2 threads.

  python bench/generate.py [--quick] [--prefill_sweep] [--decode_methods]

Config: hidden 512, 8 layers (1 dense + 7 MoE), 32 routed experts with 4 active (+1 shared),
MLA with kv_lora_rank 128, vocab 8192, one MTP layer; prompts of 512 tokens; batch 1 and 8.
Prefill tokens/s = batch * prompt / time of the prompt pass (ours: the jitted prefill; theirs: one
forward with use_cache). Decode tokens/s = batch * (new - 1) / time of the new - 1 one-token
greedy steps after it (ours: the jitted while_loop; theirs: forwards through its DynamicCache,
what `generate` does minus its bookkeeping). Times are medians of ours and theirs run in turn
after a warm-up (our compilation excluded; it is printed separately).

--prefill_sweep times the prefill with the absorbed and the expanded MLA path across prompt lengths
(the measurement behind `generation.ABSORB_PREFILL_BELOW`); --decode_methods times one decode
step per MoE dispatch method. Speculative decoding (MTP) is timed with random MTP weights
(acceptance ~0: the cost of verifying 2 tokens a step) and with a drafter whose MTP head copies
the main model's map (high acceptance: the gain when drafts are good).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.join(_ROOT, "tests"))  # hf_reference: the transformers models

import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench import common
from deepseek_jax import generation, get_preset
from deepseek_jax.model import DeepseekForCausalLM
from deepseek_jax.params import flat_state, model_from_flat
from deepseek_jax.pretrained import from_pretrained

CFG = get_preset("tiny_v3").replace(
    vocab_size=8192, hidden_size=512, intermediate_size=1408, moe_intermediate_size=256,
    num_hidden_layers=8, num_attention_heads=8, q_lora_rank=256, kv_lora_rank=128,
    qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=32,
    n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1,
    max_position_embeddings=4096, original_max_position_embeddings=4096, rope_type="default",
    num_nextn_predict_layers=1)


def _prompts(batch: int, length: int, seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).randint(2, CFG.vocab_size, (batch, length)).astype(np.int32)


def _median(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


# ------------------------------------------------------------------------------ one run each
def ours_once(model, prompts: np.ndarray, new: int, **kw) -> tuple[float, float, list]:
  """Seconds of our prefill and of our decode loop (new - 1 steps), and the tokens."""
  g = generation.Generation(model, prompts, new, eos_id=-1, **kw)
  t0 = time.perf_counter()
  g.prefill()
  t1 = time.perf_counter()
  g.decode()
  t2 = time.perf_counter()
  return t1 - t0, t2 - t1, g


def theirs_once(hf, prompts: np.ndarray, new: int) -> tuple[float, float, list]:
  """transformers: one forward over the prompt with use_cache, then new - 1 greedy one-token
  steps through its cache (what `generate` does, minus its per-step bookkeeping)."""
  import torch
  ids = torch.from_numpy(prompts.astype(np.int64))
  with torch.no_grad():
    t0 = time.perf_counter()
    out = hf(ids, use_cache=True)
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    t1 = time.perf_counter()
    toks = [tok]
    for _ in range(new - 1):
      out = hf(tok, past_key_values=out.past_key_values, use_cache=True)
      tok = out.logits[:, -1].argmax(-1, keepdim=True)
      toks.append(tok)
    t2 = time.perf_counter()
  return t1 - t0, t2 - t1, torch.cat(toks, 1).tolist()


def compare(model, hf, prompts: np.ndarray, new: int, repeats: int) -> dict:
  """Ours and theirs in turn (so machine load hits both alike); medians after a warm-up."""
  t0 = time.perf_counter()
  _, _, g = ours_once(model, prompts, new)  # compiles
  compile_s = time.perf_counter() - t0
  _, _, ref = theirs_once(hf, prompts, new)
  runs = {"ours": [], "theirs": []}
  for _ in range(repeats):
    runs["ours"].append(ours_once(model, prompts, new)[:2])
    runs["theirs"].append(theirs_once(hf, prompts, new)[:2])
  b, t = prompts.shape
  out = {"compile_s": compile_s, "same_tokens": g.results() == ref}
  for side, rs in runs.items():
    pre = statistics.median(r[0] for r in rs)
    dec = statistics.median(r[1] for r in rs)
    out[side] = {"prefill_s": pre, "decode_s": dec, "prefill_tps": b * t / pre,
                 "decode_tps": b * (new - 1) / dec}
  return out


def speculation(model, prompts: np.ndarray, new: int, repeats: int) -> dict:
  """Plain greedy against MTP self-speculative greedy, alternating; outputs must be equal."""
  _, _, plain = ours_once(model, prompts, new)
  _, _, spec = ours_once(model, prompts, new, speculative=True)
  assert spec.results() == plain.results(), "speculative output differs from plain greedy"
  t = {"plain": [], "spec": []}
  for _ in range(repeats):
    t["plain"].append(ours_once(model, prompts, new)[1])
    t["spec"].append(ours_once(model, prompts, new, speculative=True)[1])
  b = prompts.shape[0]
  tps = {k: b * (new - 1) / statistics.median(v) for k, v in t.items()}
  return {"acceptance": spec.acceptance(), "plain_tps": tps["plain"], "spec_tps": tps["spec"],
          "steps_plain": int(plain.carry.step), "steps_spec": int(spec.carry.step)}


# ------------------------------------------------------------------------------ extras
def prefill_sweep(model, lengths, repeats: int) -> list[list]:
  rows = []
  for n in lengths:
    p = _prompts(1, n)
    t = {}
    for absorb in (True, False):
      def run(absorb=absorb):
        g = generation.Generation(model, p, 1, eos_id=-1, absorb=absorb)
        g.prefill()
      run()
      t[absorb] = _median(run, repeats)
    rows.append([n, t[True] * 1e3, t[False] * 1e3, t[False] / t[True]])
  return rows


def decode_methods(model, batch: int, repeats: int) -> list[list]:
  rows = []
  p = _prompts(batch, 64)
  for method in ("blocked", "dense", "ragged"):
    def run(steps, method=method):
      g = generation.Generation(model, p, 65, eos_id=-1, moe_method=method)
      g.prefill()
      t0 = time.perf_counter()
      g.decode(steps)
      return time.perf_counter() - t0
    run(1)
    t = statistics.median(run(64) for _ in range(repeats))
    rows.append([method, batch, t / 64 * 1e3])
  return rows


def drafter(flat: dict, seed: int = 1, residual_scale: float = 0.0) -> dict:
  """MTP drafts perm(next token) and the head maps token x to perm(x) (see
  tests/test_generate_speculative.py); with the main layers' outputs scaled to 0 the main model
  is that map too, so (almost) every draft is accepted: the best case of speculation."""
  rng = np.random.RandomState(seed)
  w, d = dict(flat), CFG.hidden_size
  emb = rng.randn(CFG.vocab_size, d).astype(np.float32)
  perm = rng.permutation(CFG.vocab_size)
  w["embed_tokens.embedding"] = emb
  w["lm_head.kernel"] = np.ascontiguousarray(emb[np.argsort(perm)].T)
  for k in w:
    if k.endswith("o_proj.kernel") or "down_proj" in k:
      w[k] = np.asarray(w[k]) * (0.0 if k.startswith("mtp.") else residual_scale)
  w["mtp.0.eh_proj.kernel"] = np.concatenate([np.eye(d), np.zeros((d, d))]).astype(np.float32)
  return w


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true", help="fewer repeats and tokens")
  ap.add_argument("--prompt", type=int, default=512)
  ap.add_argument("--new", type=int, default=32)
  ap.add_argument("--prefill_sweep", action="store_true")
  ap.add_argument("--decode_methods", action="store_true")
  args = ap.parse_args()
  import torch
  torch.set_num_threads(2)
  from hf_reference import save_hf  # noqa: E402
  repeats = 1 if args.quick else 3
  new = 16 if args.quick else args.new

  with tempfile.TemporaryDirectory() as d:
    hf = save_hf(CFG, d, seed=0)  # transformers writes no MTP weights
    hf.config.use_cache = True
    model = from_pretrained(d, dtype=jnp.float32)
  flat = flat_state(model)
  print(f"config: hidden {CFG.hidden_size}, {CFG.num_hidden_layers} layers, "
        f"{CFG.n_routed_experts} experts top-{CFG.num_experts_per_tok}, vocab {CFG.vocab_size}, "
        f"prompt {args.prompt}, {new} new tokens; machine {common.machine()}")

  rows, result = [], {"config": "bench", "prompt": args.prompt, "new": new, "runs": []}
  for batch in (1, 8):
    r = compare(model, hf, _prompts(batch, args.prompt), new, repeats)
    a, b = r["ours"], r["theirs"]
    rows.append([batch, a["prefill_tps"], b["prefill_tps"], a["prefill_tps"] / b["prefill_tps"],
                 a["decode_tps"], b["decode_tps"], a["decode_tps"] / b["decode_tps"],
                 r["compile_s"], "yes" if r["same_tokens"] else "NO"])
    result["runs"].append(dict(r, batch=batch))
  print(common.table(["batch", "prefill tok/s ours", "prefill tok/s HF", "prefill ratio",
                      "decode tok/s ours", "decode tok/s HF", "decode ratio", "our compile s",
                      "same greedy tokens"], rows))

  # Speculative decoding with MTP: random MTP weights, then a drafter with good drafts.
  # the main weights of the run above plus freshly initialised MTP weights
  mtp_model = model_from_flat(CFG, {**flat_state(DeepseekForCausalLM(CFG, rngs=nnx.Rngs(0))),
                                    **flat})
  spec_rows = []
  for name, m in (("random MTP", mtp_model),
                  ("drafter MTP", model_from_flat(CFG, drafter(flat_state(mtp_model))))):
    for batch in (1, 8):
      r = speculation(m, _prompts(batch, args.prompt), new, repeats)
      spec_rows.append([name, batch, r["acceptance"], r["steps_plain"], r["steps_spec"],
                        r["plain_tps"], r["spec_tps"], r["spec_tps"] / r["plain_tps"]])
  print()
  print(common.table(["MTP speculation", "batch", "acceptance", "loop steps plain",
                      "loop steps speculative", "decode tok/s plain", "decode tok/s speculative",
                      "speedup"], spec_rows))
  result["speculative"] = spec_rows

  if args.prefill_sweep:
    sweep = prefill_sweep(model, (16, 32, 64, 128, 256, 512, 1024), repeats)
    print()
    print(common.table(["prompt", "absorbed ms", "expanded ms", "expanded/absorbed"], sweep))
    result["prefill_sweep"] = sweep
  if args.decode_methods:
    dm = decode_methods(model, 8, repeats)
    print()
    print(common.table(["MoE method", "batch", "ms per decode step"], dm))
    result["decode_methods"] = dm

  b8 = rows[1]
  result["chart"] = {"title": "decode tokens/s, batch 8 (higher is better)",
                     "labels": ["transformers", "deepseek-jax"], "values": [b8[5], b8[4]],
                     "ylabel": "tokens/s"}
  common.save_result("generate", result)


if __name__ == "__main__":
  main()
