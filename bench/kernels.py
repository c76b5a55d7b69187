"""Grouped matmul and MLA decode attention on the current platform, against peers timed in the same run.

Grouped matmul (same group sizes, near-balanced, for every method; useful FLOPs = 2*M*K*N):
  matmul      one dense [M, K] @ [K, N]: the same useful FLOPs with no grouping (the yardstick)
  ragged_dot  jax.lax.ragged_dot
  onehot      every expert on every row, masked by a one-hot (E times the useful FLOPs)
  capacity    rows scattered into [E, C, K] slots (C = largest group), one batched einsum, gathered back
  gmm         kernels_pallas.gmm, compiled (TPU; attempted on GPU; skipped on CPU, where only the
              interpreter runs it and its time says nothing about the kernel)
MLA decode (absorbed; useful bytes = the cache rows below each length, FLOPs = 2*H*(W+L) per row):
  reference   mla_decode_reference (jnp)
  kernel      mla_decode_attention (compiled on TPU/GPU; on CPU interpreted, shown for completeness)

  python bench/kernels.py [--quick] [--v3]     (--v3: DeepSeek-V3 shapes; meant for an accelerator)
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from deepseek_jax.kernels_pallas import gmm, mla_decode_attention, mla_decode_reference


def _group_sizes(m: int, e: int, seed: int = 0) -> np.ndarray:
  """Near-balanced group sizes summing to m (a multinomial draw, as a router would give)."""
  return np.random.RandomState(seed).multinomial(m, np.ones(e) / e).astype(np.int32)


def _capacity_gmm(lhs, rhs, group_sizes, capacity: int):
  """Sorted rows into fixed [E, C] slots, one batched matmul, back to [M, N]."""
  m = lhs.shape[0]
  e = rhs.shape[0]
  ends = jnp.cumsum(group_sizes)
  starts = ends - group_sizes
  row = jnp.arange(m)
  gid = jnp.searchsorted(ends, row, side="right")  # [M]
  slot = row - starts[jnp.minimum(gid, e - 1)]  # [M]
  buf = jnp.zeros((e, capacity, lhs.shape[1]), lhs.dtype).at[gid, slot].set(lhs, mode="drop")  # [E, C, K]
  y = jnp.einsum("eck,ekn->ecn", buf, rhs)  # [E, C, N]
  return y[jnp.minimum(gid, e - 1), slot]  # [M, N]


def _onehot_gmm(lhs, rhs, group_sizes):
  e = rhs.shape[0]
  ends = jnp.cumsum(group_sizes)
  gid = jnp.searchsorted(ends, jnp.arange(lhs.shape[0]), side="right")
  onehot = jax.nn.one_hot(gid, e, dtype=lhs.dtype)  # [M, E]
  return jnp.einsum("mk,ekn,me->mn", lhs, rhs, onehot)


def bench_gmm(m: int, k: int, n: int, e: int, dtype, repeats: int) -> list[dict]:
  r = np.random.RandomState(0)
  lhs = jnp.asarray(r.randn(m, k), dtype)
  rhs = jnp.asarray(r.randn(e, k, n) / np.sqrt(k), dtype)
  gs_np = _group_sizes(m, e)
  gs = jnp.asarray(gs_np)
  capacity = int(-(-gs_np.max() // 8) * 8)
  fns = {
      "matmul": jax.jit(lambda a, b, g: a @ b[0]),
      "ragged_dot": jax.jit(jax.lax.ragged_dot),
      "capacity": jax.jit(lambda a, b, g: _capacity_gmm(a, b, g, capacity)),
  }
  if e * m * n <= 2**31:  # the one-hot product materialises [M, E, N]-sized work; skip when huge
    fns["onehot"] = jax.jit(_onehot_gmm)
  backend = jax.default_backend()
  notes = {}
  if backend != "cpu":
    fns["gmm"] = jax.jit(lambda a, b, g: gmm(a, b, g))
  else:
    notes["gmm"] = "CPU runs Pallas only interpreted: not timed"
  calls = {}
  for name, f in fns.items():
    try:
      jax.block_until_ready(f(lhs, rhs, gs))
      calls[name] = lambda f=f: f(lhs, rhs, gs)
    except Exception as ex:  # e.g. the Mosaic-TPU kernel on a GPU
      notes[name] = f"{type(ex).__name__}: {str(ex).splitlines()[0][:80]}"
  t = common.time_alternating(calls, repeats=repeats, sync=jax.block_until_ready)
  useful = 2 * m * k * n
  rows = []
  for name, sec in t.items():
    rows.append({"op": "gmm", "shape": f"M{m} K{k} N{n} E{e}", "dtype": jnp.dtype(dtype).name, "method": name,
                 "ms": sec * 1e3, "gflops": useful / sec / 1e9, "gbps": None, "vs_peer": sec / t["matmul"]})
  rows += [{"op": "gmm", "shape": f"M{m} K{k} N{n} E{e}", "dtype": jnp.dtype(dtype).name, "method": name,
            "note": note} for name, note in notes.items()]
  return rows


def bench_decode(b: int, h: int, s: int, latent: int, rope: int, dtype, repeats: int) -> list[dict]:
  r = np.random.RandomState(1)
  w = latent + rope
  q = jnp.asarray(r.randn(b, h, w), dtype)
  cache = jnp.asarray(r.randn(b, s, w), dtype)
  lengths = jnp.asarray(r.randint(s // 2, s + 1, size=b), jnp.int32)  # ragged, at least half full
  interpret = jax.default_backend() == "cpu"
  kw = dict(kv_lora_rank=latent, softmax_scale=w ** -0.5)
  fns = {"reference": jax.jit(lambda q, c, n: mla_decode_reference(q, c, n, **kw)),
         "kernel" + (" (interpret)" if interpret else ""):
             jax.jit(lambda q, c, n: mla_decode_attention(q, c, n, interpret=interpret, **kw))}
  calls, notes = {}, {}
  for name, f in fns.items():
    try:
      jax.block_until_ready(f(q, cache, lengths))
      calls[name] = lambda f=f: f(q, cache, lengths)
    except Exception as ex:
      notes[name] = f"{type(ex).__name__}: {str(ex).splitlines()[0][:80]}"
  t = common.time_alternating(calls, repeats=repeats, sync=jax.block_until_ready)
  rows_read = int(np.sum(np.asarray(lengths)))
  useful_bytes = rows_read * w * jnp.dtype(dtype).itemsize
  flops = 2 * h * (w + latent) * rows_read
  shape = f"B{b} H{h} S{s} W{latent}+{rope}"
  rows = [{"op": "mla_decode", "shape": shape, "dtype": jnp.dtype(dtype).name, "method": name, "ms": sec * 1e3,
           "gflops": flops / sec / 1e9, "gbps": useful_bytes / sec / 1e9,
           "vs_peer": sec / t["reference"] if "reference" in t else None} for name, sec in t.items()]
  rows += [{"op": "mla_decode", "shape": shape, "dtype": jnp.dtype(dtype).name, "method": name, "note": note}
           for name, note in notes.items()]
  return rows


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--quick", action="store_true", help="one small shape each, 3 repeats")
  p.add_argument("--v3", action="store_true", help="DeepSeek-V3 shapes (for an accelerator)")
  args = p.parse_args()
  on_cpu = jax.default_backend() == "cpu"
  dtype = jnp.float32 if on_cpu else jnp.bfloat16
  repeats = 3 if args.quick else 5
  if args.v3:  # K 7168, N 2048, 32 local experts, 65,536 copies; 128 heads, 512 + 64 latent, 4K-32K
    gmm_shapes = [(65536, 7168, 2048, 32)]
    decode_shapes = [(8, 128, 4096, 512, 64), (8, 128, 32768, 512, 64)]
  elif args.quick:
    gmm_shapes = [(2048, 256, 512, 8)]
    decode_shapes = [(2, 16, 1024, 512, 64)]
  else:
    gmm_shapes = [(4096, 512, 1024, 8), (4096, 512, 1024, 32)]
    decode_shapes = [(4, 16, 2048, 512, 64), (1, 128, 4096, 512, 64)]
  rows = []
  for shape in gmm_shapes:
    rows += bench_gmm(*shape, dtype=dtype, repeats=repeats)
  for shape in decode_shapes:
    rows += bench_decode(*shape, dtype=dtype, repeats=repeats)
  timed = [r for r in rows if "ms" in r]
  md = [f"Backend `{jax.default_backend()}` ({common.machine()['device']}), {jnp.dtype(dtype).name}. "
        "`vs peer` = time / time of the peer (gmm: one dense matmul of the same useful FLOPs; "
        "decode: the jnp reference). GB/s counts the cache rows below each length.", "",
        common.table(["op", "shape", "method", "ms", "useful GFLOP/s", "GB/s", "vs peer"],
                     [[r["op"], r["shape"], r["method"], r["ms"], r["gflops"],
                       "" if r["gbps"] is None else r["gbps"], r["vs_peer"]] for r in timed])]
  md += [f"- {r['op']} {r['shape']} `{r['method']}`: {r['note']}" for r in rows if "note" in r]
  print("\n".join(md))
  command = "python bench/kernels.py" + (" --quick" if args.quick else "") + (" --v3" if args.v3 else "")
  common.save_result("kernels" + ("_v3" if args.v3 else ""),
                     {"rows": rows, "markdown": "\n".join(md), "machine": common.machine(),
                      "versions": common.versions(), "command": command})


if __name__ == "__main__":
  main()
