"""GPU figures for the Pallas kernels and a ~1B DeepSeek-style model, in one run with a time limit.

Measured in this run, on this device, so that every ratio has its denominator from the same run:

  roofs     the device's dense bf16 matmul rate under XLA (best of a few large shapes) and its
            memory bandwidth (a large elementwise copy and a reduction)
  gmm       `kernels_pallas.gmm` (Triton) at DeepSeek-V3 expert shapes: hidden 7168, expert width
            2048, 256 experts, top-8 copies of 4K/16K/64K tokens (M = 8 x tokens rows), bf16, both
            projections' shapes ([M, 7168] x [7168, 2048] and [M, 2048] x [2048, 7168]); forward
            and backward (d_lhs + tgmm) TFLOP/s beside XLA `jax.lax.ragged_dot` on the same
            operands, and as a share of the dense rate; first a small sweep of Triton block sizes
            at 16K tokens
  decode    `kernels_pallas.mla_decode_attention` (Triton) at V3 widths (128 heads, latent 512 +
            rope 64), 8K context, bf16: cache GB/s against the measured bandwidth, beside the jnp
            reference under XLA; first a small sweep of block sizes
  train     one optimizer step of a ~1B-parameter DeepSeek-V3-style model (MLA, 64 routed experts
            top-6 + 2 shared, bf16 compute, float32 AdamW), moe_dispatch auto (the Triton gmm) and
            ragged: MFU = training FLOPs per token (`DeepseekConfig.flops_per_token`) x tokens/s
            over the dense rate measured above

Targets (issue 16): gmm at 16K tokens >= 70% of the dense rate and >= 3x ragged_dot, forward and
backward; decode >= 60% of the measured bandwidth at 8K; training >= 40% MFU.

Order: roofs, the Triton block-size sweeps' short lists, gmm at 16K tokens (the target shape),
decode, training, then gmm at 4K and 64K tokens while time is left. Each step checks the time
left (`--budget`, seconds) before it starts and is skipped with its reason when too little is
left; every result is written as soon as it exists, to bench/results/gpu.json and gpu.md (and to
`--out`, e.g. a device run's $OUT), so a run cut short keeps what it measured. The default
budget (330 s) leaves room to run it twice in a 15-minute device lease. On a machine without a
GPU it writes that reason and exits 0.

  timeout 360 python bench/gpu.py [--budget 330] [--full] [--out DIR]
  (--full: longer sweeps and the ragged-dispatch training step too; about 10 minutes)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from deepseek_jax.kernels_pallas import (BlockSizes, DecodeBlockSizes, gmm, mla_decode_attention,
                                         mla_decode_reference)

TARGETS = {"gmm_vs_dense": 0.70, "gmm_vs_ragged": 3.0, "decode_vs_bw": 0.60, "mfu": 0.40}
V3 = dict(hidden=7168, width=2048, experts=256, top_k=8)
TOKENS = {"target": 16384, "more": (4096, 65536)}
DECODE = dict(b=32, h=128, s=8192, latent=512, rope=64)
ROOF_SHAPES = ((8192, 8192, 8192), (16384, 7168, 2048), (16384, 2048, 7168))
ROOF_BYTES = 1 << 32
TRAIN = dict(vocab_size=32768, hidden_size=1024, intermediate_size=4096, moe_intermediate_size=512,
             num_hidden_layers=10, num_attention_heads=8, q_lora_rank=512, kv_lora_rank=256,
             qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=64,
             batch=8, seq=2048)


def smoke_sizes():
  """`--smoke`: every section at toy sizes, on any backend (kernels interpreted on the CPU), to
  check this script end to end before it spends device time."""
  V3.update(hidden=256, width=128, experts=8, top_k=2)
  TOKENS.update(target=256, more=(128,))
  DECODE.update(b=2, h=16, s=256, latent=64, rope=16)
  globals().update(ROOF_SHAPES=((256, 256, 256),), ROOF_BYTES=1 << 22)
  TRAIN.update(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
               num_hidden_layers=2, num_attention_heads=2, q_lora_rank=32, kv_lora_rank=32,
               qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=16,
               batch=2, seq=64)


class Run:
  """Results, notes and the clock of one run; `save()` writes them all after every section."""

  def __init__(self, budget: float, out: str | None):
    self.t0, self.budget, self.out = time.time(), budget, out
    self.res: dict = {"device": None, "notes": [], "sections": {}}

  def left(self) -> float:
    return self.budget - (time.time() - self.t0)

  def note(self, text: str):
    print("note:", text, flush=True)
    self.res["notes"].append(text)

  def save(self):
    md = markdown(self.res)
    self.res["markdown"] = md
    paths = [common.RESULTS_DIR] + ([self.out] if self.out else [])
    for d in paths:
      os.makedirs(d, exist_ok=True)
      with open(os.path.join(d, "gpu.json"), "w") as f:
        json.dump(self.res, f, indent=1, default=str)
      with open(os.path.join(d, "gpu.md"), "w") as f:
        f.write(md + "\n")


def timed(fn, *args, reps: int = 10, min_time: float = 0.5) -> float:
  """Median seconds of fn(*args) after one warm-up call (compilation), at least `reps` calls or
  `min_time` seconds of them."""
  jax.block_until_ready(fn(*args))
  times = []
  start = time.perf_counter()
  while len(times) < reps or (time.perf_counter() - start < min_time and len(times) < 200):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


# ---------------------------------------------------------------------------------------- roofs
def roofs(run: Run):
  best = {"tflops": 0.0}
  for m, k, n in ROOF_SHAPES:
    a = jnp.ones((m, k), jnp.bfloat16)
    b = jnp.ones((k, n), jnp.bfloat16)
    t = timed(jax.jit(lambda a, b: a @ b), a, b)
    tf = 2 * m * k * n / t / 1e12
    print(f"dense bf16 {m}x{k}x{n}: {tf:.0f} TFLOP/s", flush=True)
    if tf > best["tflops"]:
      best = {"tflops": tf, "shape": [m, k, n]}
  x = jnp.ones((ROOF_BYTES // 2,), jnp.bfloat16)  # 4 GiB
  t_copy = timed(jax.jit(lambda x: x * 2), x)
  t_read = timed(jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32)), x)
  bw = max(2 * x.nbytes / t_copy, x.nbytes / t_read) / 1e9
  del x
  run.res["sections"]["roofs"] = {"dense_bf16_tflops": best["tflops"], "dense_shape": best["shape"],
                                  "bandwidth_gbps": bw, "copy_gbps": 2 * ROOF_BYTES / t_copy / 1e9,
                                  "read_gbps": ROOF_BYTES / t_read / 1e9}
  print(f"bandwidth {bw:.0f} GB/s", flush=True)


# ------------------------------------------------------------------------------------------ gmm
def _operands(tokens: int, k: int, n: int, seed: int = 0):
  e, top_k = V3["experts"], V3["top_k"]
  m = tokens * top_k
  rng = np.random.default_rng(seed)
  sizes = rng.multinomial(m, np.ones(e) / e).astype(np.int32)  # a router's near-balanced load
  key = jax.random.key(seed)
  k1, k2, k3 = jax.random.split(key, 3)
  lhs = jax.random.normal(k1, (m, k), jnp.bfloat16)
  rhs = (jax.random.normal(k2, (e, k, n), jnp.float32) / np.sqrt(k)).astype(jnp.bfloat16)
  cot = jax.random.normal(k3, (m, n), jnp.bfloat16)
  return lhs, rhs, jnp.asarray(sizes), cot


def _fwd_bwd(f):
  """(forward, forward+backward) jitted for a grouped matmul f(lhs, rhs, group_sizes)."""
  fwd = jax.jit(lambda a, b, g: f(a, b, g))

  def both(a, b, g, c):
    out, pull = jax.vjp(lambda a, b: f(a, b, g), a, b)
    return out, pull(c)
  return fwd, jax.jit(both)


def _ragged(a, b, g):
  return jax.lax.ragged_dot(a, b, g, preferred_element_type=jnp.bfloat16)


def gmm_sweep(run: Run, full: bool) -> BlockSizes:
  """Forward time of a few Triton block sizes at 16K tokens (gate/up shape); returns the best."""
  lhs, rhs, gs, _ = _operands(TOKENS["target"], V3["hidden"], V3["width"])
  default = BlockSizes.default("gpu")
  cands = [default, BlockSizes(128, 64, 128, 4, 3), BlockSizes(128, 64, 256, 8, 3),
           BlockSizes(128, 32, 128, 4, 4), BlockSizes(64, 64, 128, 4, 3),
           BlockSizes(256, 64, 128, 8, 3)]
  if not full:
    cands = cands[:3]
  rows, best = [], (float("inf"), default)
  flops = 2 * lhs.shape[0] * lhs.shape[1] * rhs.shape[2]
  for bs in dict.fromkeys(cands):
    if run.left() < 60:
      run.note("gmm sweep cut short by the time budget")
      break
    try:
      t = timed(jax.jit(functools.partial(gmm, block_sizes=bs)), lhs, rhs, gs, reps=5)
      rows.append({"block_sizes": bs.__dict__, "ms": t * 1e3, "tflops": flops / t / 1e12})
      print(f"gmm sweep {bs}: {flops / t / 1e12:.0f} TFLOP/s", flush=True)
      best = min(best, (t, bs), key=lambda x: x[0])
    except Exception as ex:  # noqa: BLE001 - a config that does not compile is a result too
      rows.append({"block_sizes": bs.__dict__, "error": f"{type(ex).__name__}: {str(ex)[:200]}"})
  run.res["sections"]["gmm_sweep"] = {"tokens": TOKENS["target"], "rows": rows, "best": best[1].__dict__,
                                      "default": default.__dict__}
  return best[1]


def gmm_bench(run: Run, tokens_list: tuple[int, ...]):
  dense = run.res["sections"].get("roofs", {}).get("dense_bf16_tflops")
  bs = BlockSizes(**run.res["sections"].get("gmm_sweep", {}).get("best", {})) if (
      "gmm_sweep" in run.res["sections"]) else BlockSizes.default("gpu")
  sec = run.res["sections"].setdefault("gmm", {"block_sizes": bs.__dict__, "rows": []})
  rows = sec["rows"]
  ours = functools.partial(gmm, block_sizes=bs)
  for tokens in tokens_list:
    for k, n, proj in ((V3["hidden"], V3["width"], "gate/up"), (V3["width"], V3["hidden"], "down")):
      if run.left() < 90:
        run.note(f"gmm at {tokens} tokens ({proj}) not run: time budget")
        continue
      lhs, rhs, gs, cot = _operands(tokens, k, n)
      m = lhs.shape[0]
      flops = 2 * m * k * n
      row = {"tokens": tokens, "proj": proj, "M": m, "K": k, "N": n}
      for name, f in (("pallas", ours), ("ragged_dot", _ragged)):
        fwd, both = _fwd_bwd(f)
        try:
          t_f = timed(fwd, lhs, rhs, gs, reps=5)
          t_fb = timed(both, lhs, rhs, gs, cot, reps=5)
          row[name] = {"fwd_ms": t_f * 1e3, "fwd_bwd_ms": t_fb * 1e3,
                       "fwd_tflops": flops / t_f / 1e12,
                       "bwd_tflops": 2 * flops / max(t_fb - t_f, 1e-9) / 1e12,
                       "fwd_bwd_tflops": 3 * flops / t_fb / 1e12}
        except Exception as ex:  # noqa: BLE001
          row[name] = {"error": f"{type(ex).__name__}: {str(ex)[:200]}"}
        print(f"gmm {tokens} {proj} {name}: {row[name]}", flush=True)
      p, r = row["pallas"], row["ragged_dot"]
      if "fwd_ms" in p and "fwd_ms" in r:
        row["fwd_vs_ragged"] = r["fwd_ms"] / p["fwd_ms"]
        row["bwd_vs_ragged"] = (r["fwd_bwd_ms"] - r["fwd_ms"]) / max(p["fwd_bwd_ms"] - p["fwd_ms"], 1e-9)
      if "fwd_ms" in p and dense:
        row["fwd_vs_dense"] = p["fwd_tflops"] / dense
        row["bwd_vs_dense"] = p["bwd_tflops"] / dense
      rows.append(row)
      del lhs, rhs, gs, cot
      run.save()


# --------------------------------------------------------------------------------------- decode
def decode_bench(run: Run, full: bool):
  bw = run.res["sections"].get("roofs", {}).get("bandwidth_gbps")
  b, h, s, latent, rope = (DECODE[k] for k in ("b", "h", "s", "latent", "rope"))
  key = jax.random.key(1)
  q = jax.random.normal(key, (b, h, latent + rope), jnp.bfloat16)
  cache = jax.random.normal(jax.random.fold_in(key, 1), (b, s, latent + rope), jnp.bfloat16)
  lengths = jnp.full((b,), s, jnp.int32)
  nbytes = cache.nbytes + q.nbytes
  kw = dict(kv_lora_rank=latent, softmax_scale=(128 + 64) ** -0.5)
  default = DecodeBlockSizes.default("gpu")
  cands = [default, DecodeBlockSizes(64, 8, 16, 4, 2), DecodeBlockSizes(64, 32, 16, 4, 2),
           DecodeBlockSizes(32, 16, 32, 4, 2), DecodeBlockSizes(64, 16, 32, 8, 2),
           DecodeBlockSizes(128, 16, 16, 8, 2), DecodeBlockSizes(64, 16, 64, 8, 2)]
  if not full:
    cands = cands[:4]
  rows = []
  sec = {"shape": {"B": b, "H": h, "S": s, "L": latent, "R": rope}, "rows": rows,
         "bandwidth_gbps": bw}
  run.res["sections"]["decode"] = sec
  for bs in dict.fromkeys(cands):
    if run.left() < 30:
      run.note("decode sweep cut short by the time budget")
      break
    try:
      t = timed(jax.jit(functools.partial(mla_decode_attention, block_sizes=bs, **kw)), q, cache,
                lengths)
      rows.append({"method": "pallas", "block_sizes": bs.__dict__, "us": t * 1e6,
                   "gbps": nbytes / t / 1e9})
    except Exception as ex:  # noqa: BLE001
      rows.append({"method": "pallas", "block_sizes": bs.__dict__,
                   "error": f"{type(ex).__name__}: {str(ex)[:200]}"})
    print(f"decode {rows[-1]}", flush=True)
  try:
    t = timed(jax.jit(functools.partial(mla_decode_reference, **kw)), q, cache, lengths)
    rows.append({"method": "xla (jnp reference)", "us": t * 1e6, "gbps": nbytes / t / 1e9})
  except Exception as ex:  # noqa: BLE001
    rows.append({"method": "xla (jnp reference)", "error": f"{type(ex).__name__}: {str(ex)[:200]}"})
  ok = [r for r in rows if r["method"] == "pallas" and "gbps" in r]
  if ok:
    best = max(ok, key=lambda r: r["gbps"])
    sec["best"] = best
    if bw:
      sec["best_vs_bw"] = best["gbps"] / bw
      sec["default_vs_bw"] = (ok[0]["gbps"] / bw) if ok[0]["block_sizes"] == default.__dict__ else None


# ---------------------------------------------------------------------------------------- train
def train_bench(run: Run, full: bool):
  from flax import nnx

  from deepseek_jax import get_preset, optim
  from deepseek_jax.model import DeepseekForCausalLM
  from deepseek_jax.train_config import TrainConfig
  from deepseek_jax.train_step import make_train_step

  dense = run.res["sections"].get("roofs", {}).get("dense_bf16_tflops")
  dims = {k: v for k, v in TRAIN.items() if k not in ("batch", "seq")}
  base = get_preset("deepseek_v3").replace(
      **dims, first_k_dense_replace=1, num_experts_per_tok=6, n_group=8, topk_group=4,
      n_shared_experts=2, num_nextn_predict_layers=0, max_position_embeddings=4096,
      original_max_position_embeddings=4096)
  batch, seq = TRAIN["batch"], TRAIN["seq"]
  tc = TrainConfig(learning_rate=1e-4, warmup_steps=0, mtp_weight=0.0, clip_norm=1.0,
                   weight_decay=0.1, seq_len=seq, batch_size=batch)
  flops_tok = base.flops_per_token(seq, training=True)
  sec = {"params": base.num_params(), "active_params": base.num_params(active=True),
         "batch": batch, "seq": seq, "flops_per_token": flops_tok, "rows": []}
  run.res["sections"]["train"] = sec
  tokens = np.random.default_rng(0).integers(0, base.vocab_size, (1, batch, seq + 1), np.int32)
  for method in (("auto", "ragged") if full else ("auto",)):
    if run.left() < 120:
      run.note(f"training step with moe_dispatch={method} not run: time budget")
      continue
    try:
      cfg = base.replace(moe_dispatch=method)
      model = DeepseekForCausalLM(cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32,
                                  rngs=nnx.Rngs(0))
      graphdef, params, rest = nnx.split(model, nnx.Param, ...)
      tx = optim.make_optimizer(tc.optim_config())
      state = {"params": params, "rest": rest, "opt_state": tx.init(params),
               "step": jnp.zeros((), jnp.int32)}
      del model
      step = jax.jit(make_train_step(graphdef, tx, cfg, tc), donate_argnums=(0,))
      batch_arr = jnp.asarray(tokens)
      t0 = time.perf_counter()
      state, logs = step(state, batch_arr)
      jax.block_until_ready(logs)
      compile_s = time.perf_counter() - t0
      times = []
      for _ in range(10):
        t = time.perf_counter()
        state, logs = step(state, batch_arr)
        jax.block_until_ready(logs)
        times.append(time.perf_counter() - t)
      t = statistics.median(times)
      tps = batch * seq / t
      row = {"moe_dispatch": method, "step_ms": t * 1e3, "tokens_per_s": tps,
             "tflops": flops_tok * tps / 1e12, "compile_s": compile_s,
             "loss": float(logs["loss"])}
      if dense:
        row["mfu"] = flops_tok * tps / 1e12 / dense
      sec["rows"].append(row)
      del state
    except Exception as ex:  # noqa: BLE001
      sec["rows"].append({"moe_dispatch": method, "error": f"{type(ex).__name__}: {str(ex)[:300]}"})
    print(f"train {sec['rows'][-1]}", flush=True)
    run.save()


# ------------------------------------------------------------------------------------- markdown
def _pct(x):
  return "" if x is None else f"{x:.0%}"


def markdown(res: dict) -> str:
  s = res["sections"]
  out = [f"### GPU: {res.get('device')} (jax {res.get('jax')})", ""]
  r = s.get("roofs")
  if r:
    out += [f"Dense bf16 matmul (XLA, best of three shapes): **{r['dense_bf16_tflops']:.0f} "
            f"TFLOP/s**; memory bandwidth (copy / read): **{r['bandwidth_gbps']:.0f} GB/s**.", ""]
  targets = []
  g = s.get("gmm")
  if g and g["rows"]:
    out += [f"Grouped matmul, V3 experts (hidden {V3['hidden']}, width {V3['width']}, "
            f"E={V3['experts']}, top-{V3['top_k']}), bf16, Triton blocks {g['block_sizes']}:",
            "", common.table(
                ["tokens", "proj", "ours fwd TFLOP/s", "ours bwd TFLOP/s", "ragged_dot fwd",
                 "ragged_dot bwd", "fwd vs dense", "bwd vs dense", "fwd vs ragged",
                 "bwd vs ragged"],
                [[row["tokens"], row["proj"], row["pallas"].get("fwd_tflops", "error"),
                  row["pallas"].get("bwd_tflops", ""), row["ragged_dot"].get("fwd_tflops", "error"),
                  row["ragged_dot"].get("bwd_tflops", ""), _pct(row.get("fwd_vs_dense")),
                  _pct(row.get("bwd_vs_dense")), row.get("fwd_vs_ragged", ""),
                  row.get("bwd_vs_ragged", "")] for row in g["rows"]]), ""]
    for row in g["rows"]:
      if row["tokens"] == TOKENS["target"]:
        for d in ("fwd", "bwd"):
          v = row.get(f"{d}_vs_dense")
          targets.append([f"gmm {d} vs dense bf16, 16K tokens, {row['proj']}", ">= 70%", _pct(v),
                          v is not None and v >= TARGETS["gmm_vs_dense"]])
          v = row.get(f"{d}_vs_ragged")
          targets.append([f"gmm {d} vs ragged_dot, 16K tokens, {row['proj']}", ">= 3x",
                          "" if v is None else f"{v:.2f}x",
                          v is not None and v >= TARGETS["gmm_vs_ragged"]])
  sw = s.get("gmm_sweep")
  if sw:
    out += ["Triton block-size sweep (gmm forward, 16K tokens, gate/up):", "", common.table(
        ["block sizes", "TFLOP/s"], [[str(row["block_sizes"]), row.get("tflops", row.get("error"))]
                                     for row in sw["rows"]]), ""]
  d = s.get("decode")
  if d and d["rows"]:
    out += [f"MLA decode {d['shape']}, bf16 (GB/s of cache + query read):", "", common.table(
        ["method", "block sizes", "us", "GB/s", "vs bandwidth"],
        [[row["method"], str(row.get("block_sizes", "")), row.get("us", row.get("error", "")),
          row.get("gbps", ""), _pct(row["gbps"] / d["bandwidth_gbps"])
          if "gbps" in row and d.get("bandwidth_gbps") else ""] for row in d["rows"]]), ""]
    v = d.get("best_vs_bw")
    targets.append(["MLA decode vs measured bandwidth, 8K context (best blocks)", ">= 60%",
                    _pct(v), v is not None and v >= TARGETS["decode_vs_bw"]])
  t = s.get("train")
  if t and t["rows"]:
    out += [f"Training, {t['params'] / 1e9:.2f}B parameters ({t['active_params'] / 1e9:.2f}B "
            f"active), batch {t['batch']} x {t['seq']}, bf16 compute, AdamW:", "", common.table(
                ["moe_dispatch", "step ms", "tokens/s", "TFLOP/s", "MFU (vs measured dense)"],
                [[row["moe_dispatch"], row.get("step_ms", row.get("error", "")),
                  row.get("tokens_per_s", ""), row.get("tflops", ""), _pct(row.get("mfu"))]
                 for row in t["rows"]]), ""]
    for row in t["rows"]:
      if row["moe_dispatch"] == "auto":
        targets.append(["training MFU, ~1B model", ">= 40%", _pct(row.get("mfu")),
                        (row.get("mfu") or 0) >= TARGETS["mfu"]])
  if targets:
    out += ["Targets:", "", common.table(["what", "target", "measured", "met"],
                                         [[a, b, c, "yes" if ok else "**no**"]
                                          for a, b, c, ok in targets]), ""]
  out += [f"- {n}" for n in res["notes"]]
  return "\n".join(out).rstrip()


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--budget", type=float, default=330, help="seconds for the whole run")
  p.add_argument("--full", action="store_true", help="longer sweeps, ragged training too")
  p.add_argument("--out", default=None, help="also write gpu.json and gpu.md here")
  p.add_argument("--smoke", action="store_true", help="toy sizes on any backend (a script check)")
  p.add_argument("--quick", action="store_true", help="(run_all's flag; the default is short)")
  args = p.parse_args()
  run = Run(args.budget, args.out)
  run.res["jax"] = jax.__version__
  if args.smoke:
    smoke_sizes()
    run.note("smoke run: toy sizes, figures meaningless")
  elif jax.default_backend() != "gpu":
    run.res["device"] = f"none ({jax.default_backend()})"
    run.note(f"not run: this machine has no GPU (JAX backend {jax.default_backend()!r}); "
             "run `timeout 360 python bench/gpu.py` on one")
    run.save()
    print(run.res["markdown"])
    return
  run.res["device"] = jax.devices()[0].device_kind
  run.res["versions"] = common.versions()
  sections = [("roofs", 30, lambda: roofs(run)),
              ("gmm sweep", 60, lambda: gmm_sweep(run, args.full)),
              ("gmm 16K", 60, lambda: gmm_bench(run, (TOKENS["target"],))),
              ("decode", 40, lambda: decode_bench(run, args.full)),
              ("train", 100, lambda: train_bench(run, args.full)),
              ("gmm 4K and 64K", 60, lambda: gmm_bench(run, TOKENS["more"]))]
  for name, need, fn in sections:
    if run.left() < need:
      run.note(f"{name}: not run, {run.left():.0f} s left of the budget (needs ~{need} s)")
      continue
    t0 = time.time()
    try:
      fn()
    except Exception as ex:  # noqa: BLE001 - written down, never hidden
      run.note(f"{name} failed: {type(ex).__name__}: {str(ex)[:300]}")
      traceback.print_exc()
    print(f"== {name}: {time.time() - t0:.0f} s, {run.left():.0f} s left", flush=True)
    run.save()
  print(run.res["markdown"])


if __name__ == "__main__":
  main()
