"""Which MoE dispatch to use by default, by measurement: every path against one dense matmul doing
the same useful FLOPs, forward and forward+backward, across expert and token counts.

  python bench/dispatch.py [--quick]
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
from deepseek_jax import dispatch

D, I, K = 512, 256, 4


def _case(n, e, seed=0):
  r = np.random.RandomState(seed)
  x = jnp.asarray(r.randn(n, D), jnp.float32)
  ws = [jnp.asarray(r.randn(*s) * 0.05, jnp.float32) for s in ((e, D, I), (e, D, I), (e, I, D))]
  idx = jnp.asarray(np.argsort(-r.randn(n, e), -1)[:, :K], jnp.int32)
  w = jnp.asarray(r.rand(n, K), jnp.float32)
  return x, idx, w, ws


def measure(n: int, e: int, methods, repeats: int) -> list[dict]:
  x, idx, w, ws = _case(n, e)
  xs = jnp.asarray(np.random.RandomState(1).randn(n * K, D), jnp.float32)

  def dense_mm(a, g, u, d):  # the same useful FLOPs as one expert holding every copy
    return jnp.dot(jax.nn.silu(a @ g) * (a @ u), d)

  fns = {"matmul": (jax.jit(dense_mm), (xs, ws[0][0], ws[1][0], ws[2][0]))}
  for m in methods:
    fns[m] = (jax.jit(lambda *a, m=m: dispatch.moe_experts(*a, method=m)), (x, idx, w, *ws))
  rows = []
  for mode in ("forward", "forward+backward"):
    calls = {}
    for name, (f, args) in fns.items():
      if mode == "forward+backward":
        g = jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) ** 2),
                             argnums=(0,) if name == "matmul" else (0, 3, 4, 5)))
        calls[name] = lambda g=g, args=args: g(*args)
      else:
        calls[name] = lambda f=f, args=args: f(*args)
    t = common.time_alternating(calls, repeats=repeats, sync=jax.block_until_ready)
    useful = 2 * 3 * n * K * D * I * (1 if mode == "forward" else 3)
    for name, sec in t.items():
      rows.append({"tokens": n, "experts": e, "mode": mode, "method": name, "ms": sec * 1e3,
                   "gflops": useful / sec / 1e9, "vs_matmul": sec / t["matmul"]})
  return rows


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--quick", action="store_true")
  args = p.parse_args()
  methods = ["dense", "ragged", "blocked"]
  if jax.default_backend() in ("tpu", "gpu"):
    methods.append("pallas")
  shapes = [(1024, 8), (1024, 32), (4096, 32), (4096, 64)] if not args.quick else [(1024, 16)]
  rows = []
  for n, e in shapes:
    rows += measure(n, e, methods, repeats=3 if args.quick else 5)
  default = dispatch.default_method()
  md = [f"D={D}, I={I}, K={K}, float32. Default on this platform: `{default}`. "
        "`vs matmul` = time / time of one dense matmul chain with the same useful FLOPs.", "",
        common.table(["tokens", "experts", "mode", "method", "ms", "useful GFLOP/s", "vs matmul"],
                     [[r["tokens"], r["experts"], r["mode"], r["method"], r["ms"], r["gflops"],
                       r["vs_matmul"]] for r in rows])]
  print("\n".join(md))
  n, e = shapes[-1]
  last = [r for r in rows if (r["tokens"], r["experts"], r["mode"]) == (n, e, "forward+backward")]
  chart = {"title": f"forward+backward, {n} tokens, {e} experts (time / dense matmul)",
           "labels": [r["method"] for r in last], "values": [r["vs_matmul"] for r in last],
           "ylabel": "x the time of one dense matmul with the same useful FLOPs", "reference": 1.0}
  common.save_result("dispatch", {"rows": rows, "default": default, "markdown": "\n".join(md),
                                  "chart": chart,
                                  "machine": common.machine(), "versions": common.versions(),
                                  "command": "python bench/dispatch.py" + (" --quick" if args.quick else "")})


if __name__ == "__main__":
  main()
