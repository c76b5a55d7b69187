"""Which MoE dispatch to use by default, by measurement: every path against one dense matmul doing
the same useful FLOPs, forward and forward+backward, across expert and token counts.

  python bench/dispatch.py [--quick] [--shapes 4096x32,1024x8] [--methods blocked,capacity]
      [--repeats 9]
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
from deepseek_jax.kernels_pallas import tiled_gmm

D, I, K = 512, 256, 4


def measure(n: int, e: int, methods, repeats: int) -> list[dict]:
  x, idx, w, ws = common.moe_case(n, e, D, I, K)
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
        # gradients of the rows and of every weight on both sides: the 3x useful FLOPs below
        g = jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) ** 2),
                             argnums=(0, 1, 2, 3) if name == "matmul" else (0, 3, 4, 5)))
        calls[name] = lambda g=g, args=args: g(*args)
      else:
        calls[name] = lambda f=f, args=args: f(*args)
    t = common.time_alternating(calls, repeats=repeats, sync=jax.block_until_ready)
    useful = 2 * 3 * n * K * D * I * (1 if mode == "forward" else 3)
    for name, sec in t.items():
      rows.append({"tokens": n, "experts": e, "mode": mode, "method": name, "ms": sec * 1e3,
                   "gflops": useful / sec / 1e9, "vs_matmul": sec / t["matmul"]})
  return rows


def breakdown(n: int, e: int, repeats: int) -> list[list]:
  """Where `blocked` spends its forward time: the tiled matmuls alone (over the M rows the copies
  fill, in tiles) against the whole path (which also pads each group to whole tiles), beside one
  dense matmul chain of the same useful FLOPs and the same chain cut into the same tiles (a loop
  over tiles, one weight for all)."""
  x, idx, w, ws = common.moe_case(n, e, D, I, K)
  m = n * K
  tile = dispatch.tile_size(m, e)
  num_tiles = -(-(m + e * (tile - 1)) // tile)
  xs = jnp.asarray(np.random.RandomState(1).randn(num_tiles * tile, D), jnp.float32)
  groups = jnp.asarray(np.minimum(np.arange(num_tiles) * e // num_tiles, e - 1), jnp.int32)
  one = jnp.zeros((num_tiles,), jnp.int32)
  g, u, dn = ws

  used = jnp.int32(m // tile)  # the tiles the copies fill, without the padding's extra tiles

  def chain(a, gm, group):
    mm = lambda lhs, w: tiled_gmm(lhs, w, group, used)  # noqa: E731
    return mm(jax.nn.silu(mm(a, gm[0])) * mm(a, gm[1]), gm[2])

  xm = xs[:m]
  fns = {
      "one dense matmul chain (M rows)": (jax.jit(lambda a: jnp.dot(
          jax.nn.silu(a @ g[0]) * (a @ u[0]), dn[0])), (xm,)),
      "same chain in row tiles, one weight": (jax.jit(lambda a: chain(a, (g, u, dn), one)),
                                              (xs,)),
      "tiled matmuls, a weight per tile": (jax.jit(lambda a: chain(a, (g, u, dn), groups)),
                                           (xs,)),
      "whole blocked path (sort, row gathers, matmuls, weighted sum)": (
          jax.jit(lambda *a: dispatch.moe_experts(*a, method="blocked")), (x, idx, w, *ws)),
  }
  t = common.time_alternating({k: (lambda f=f, a=a: f(*a)) for k, (f, a) in fns.items()},
                              repeats=repeats, sync=jax.block_until_ready)
  base = t["one dense matmul chain (M rows)"]
  return [[k, v * 1e3, v / base] for k, v in t.items()] + [
      [f"(tile {tile} rows, {num_tiles} tiles for {m} copies: {num_tiles * tile / m:.2f}x rows "
       "after padding)", "", ""]]


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--quick", action="store_true")
  p.add_argument("--shapes", default="", help="tokens x experts, comma-separated (4096x32,...)")
  p.add_argument("--methods", default="", help="comma-separated dispatch methods to time")
  p.add_argument("--repeats", type=int, default=0, help="timed runs per side (median)")
  args = p.parse_args()
  methods = ["dense", "ragged", "blocked", "capacity", "native"]
  if jax.default_backend() in ("tpu", "gpu"):
    methods.append("pallas")
  if args.methods:
    methods = args.methods.split(",")
  shapes = [(1024, 8), (1024, 32), (4096, 32), (4096, 64)] if not args.quick else [(1024, 16)]
  if args.shapes:
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
  rows = []
  for n, e in shapes:
    # ragged_dot computes every group in full here (about 50x a matmul at 4096 x 32): past that
    # size it would take minutes of the bench's budget to say so again
    slow = n * e > 4096 * 32 and jax.default_backend() == "cpu"
    rows += measure(n, e, [m for m in methods if not (slow and m == "ragged")],
                    repeats=args.repeats or (3 if args.quick else 5))
  default = dispatch.default_method()
  md = [f"D={D}, I={I}, K={K}, float32. Default on this platform: `{default}`. "
        "`vs matmul` = time / time of one dense matmul chain with the same useful FLOPs. On the "
        "CPU, ragged is left out past 4096 tokens x 32 experts (it computes every group in full).",
        "",
        common.table(["tokens", "experts", "mode", "method", "ms", "useful GFLOP/s", "vs matmul"],
                     [[r["tokens"], r["experts"], r["mode"], r["method"], r["ms"], r["gflops"],
                       r["vs_matmul"]] for r in rows])]
  n, e = shapes[-1]
  bd = breakdown(n, e, 3 if args.quick else 5)
  md += ["", f"Forward-time breakdown of `blocked` at {n} tokens x {e} experts:", "",
         common.table(["what", "ms", "x dense matmul"], bd)]
  print("\n".join(md))
  last = [r for r in rows if (r["tokens"], r["experts"], r["mode"]) == (n, e, "forward+backward")]
  chart = {"title": f"forward+backward, {n} tokens, {e} experts (time / dense matmul)",
           "labels": [r["method"] for r in last], "values": [r["vs_matmul"] for r in last],
           "ylabel": "x the time of one dense matmul with the same useful FLOPs", "reference": 1.0}
  common.save_result("dispatch", {"rows": rows, "default": default, "markdown": "\n".join(md),
                                  "breakdown": bd,
                                  "chart": chart,
                                  "machine": common.machine(), "versions": common.versions(),
                                  "command": " ".join(["python bench/dispatch.py"] + sys.argv[1:])})


if __name__ == "__main__":
  main()
