"""Expert parallelism against XLA's own partitioning of the same MoE layer, and both against one
device, on 8 devices (host CPU devices when no accelerators: XLA_FLAGS is set here).

  python bench/sharding.py [--quick]

Per mesh, one routed-experts layer (forward, and forward+backward) three ways, alternating:
  one device   `dispatch.moe_experts` on a single device, unsharded (the peer);
  gspmd        the same function under jit with the weights sharded by the rules (experts over
               "expert", embed over "fsdp", mlp over "tensor") and tokens over the batch axes:
               XLA decides the collectives (the model's path as written);
  ep           `sharding.expert_parallel_moe`: tokens to their experts' devices by all-to-all
               (dropless), and with capacity factor 1.25 (bounded buffers).
Also reported: XLA's compiled temporary memory per device (`memory_analysis`), which shows
whether the path gathers every expert onto each device. Host CPU devices share the cores, so on
a CPU the times measure the partitioning overhead, not a speed-up.
"""

from __future__ import annotations

import argparse
import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from deepseek_jax import sharding  # noqa: E402
from bench import common  # noqa: E402
from deepseek_jax import dispatch  # noqa: E402

NAMES = ("layers.1.mlp.experts.gate_proj", "layers.1.mlp.experts.up_proj",
         "layers.1.mlp.experts.down_proj")


def _temp_bytes(fn, *args) -> int | None:
  try:
    return int(fn.lower(*args).compile().memory_analysis().temp_size_in_bytes)
  except Exception:  # not every backend reports it
    return None


def measure(sizes: dict, n: int, e: int, d: int, i: int, k: int, repeats: int) -> list[dict]:
  x, idx, w, ws = common.moe_case(n, e, d, i, k)
  mesh = sharding.make_mesh(**sizes)
  shardings = sharding.param_shardings(dict(zip(NAMES, ws)), mesh)
  ws_sh = [jax.device_put(a, shardings[p]) for p, a in zip(NAMES, ws)]
  tok = jax.sharding.NamedSharding(mesh, sharding.batch_spec(ndim=2))
  x_sh, idx_sh, w_sh = (jax.device_put(a, tok) for a in (x, idx, w))

  def local(x, i_, w_, *ws):
    return dispatch.moe_experts(x, i_, w_, *ws, method="blocked")

  def ep(cf):
    return lambda x, i_, w_, *ws: sharding.expert_parallel_moe(x, i_, w_, *ws, mesh=mesh,
                                                               capacity_factor=cf)

  sides = {"one device": (local, (x, idx, w, *ws)), "gspmd": (local, (x_sh, idx_sh, w_sh, *ws_sh)),
           "ep dropless": (ep(None), (x_sh, idx_sh, w_sh, *ws_sh)),
           "ep cf 1.25": (ep(1.25), (x_sh, idx_sh, w_sh, *ws_sh))}
  ref = np.asarray(jax.jit(local)(x, idx, w, *ws))
  rows = []
  for mode in ("forward", "forward+backward"):
    fns, temp = {}, {}
    for name, (f, args) in sides.items():
      if mode == "forward+backward":
        f = jax.grad(lambda *a, f=f: jnp.sum(f(*a) ** 2), argnums=(0, 3, 4, 5))
      jf = jax.jit(f)
      with jax.set_mesh(mesh):
        temp[name] = _temp_bytes(jf, *args)
        jax.block_until_ready(jf(*args))
      fns[name] = lambda jf=jf, args=args: jf(*args)
    with jax.set_mesh(mesh):
      t = common.time_alternating(fns, repeats=repeats, sync=jax.block_until_ready)
      outs = {name: np.asarray(jax.jit(f)(*args)) for name, (f, args) in sides.items()
              if mode == "forward"}
    errs = {name: float(np.max(np.abs(o - ref))) for name, o in outs.items()}
    # tokens that lost a copy (capacity overflow): their output moved off the exact one
    changed = {name: float(np.mean(np.max(np.abs(o - ref), axis=-1) > 1e-4 * np.abs(ref).max()))
               for name, o in outs.items()}
    for name in sides:
      rows.append({"mesh": sizes, "mode": mode, "path": name, "ms": t[name] * 1e3,
                   "vs_one_device": t[name] / t["one device"],
                   "temp_mib": None if temp[name] is None else temp[name] / 2 ** 20,
                   "max_abs_diff": errs.get(name), "tokens_changed": changed.get(name)})
  return rows


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  args = ap.parse_args()
  if jax.device_count() < 8:
    raise SystemExit(f"bench/sharding.py needs 8 devices; this machine has {jax.device_count()}")
  n, e, d, i, k = (512, 16, 128, 64, 4) if args.quick else (2048, 32, 512, 256, 4)
  repeats = 3 if args.quick else 5
  rows = []
  for sizes in ({"expert": 8}, {"fsdp": 2, "expert": 4}, {"data": 2, "expert": 2, "tensor": 2}):
    rows += measure(sizes, n, e, d, i, k, repeats)
  mesh_text = lambda s: " x ".join(f"{a} {v}" for a, v in s.items())
  print(f"{n} tokens, top-{k} of {e} experts, hidden {d}, expert width {i}, float32; "
        f"{jax.device_count()} {jax.devices()[0].platform} devices; median of {repeats}.\n")
  print(common.table(
      ["mesh", "mode", "path", "ms", "x one device", "XLA temp MiB/device", "max |diff| vs one",
       "tokens changed"],
      [[mesh_text(r["mesh"]), r["mode"], r["path"], r["ms"], r["vs_one_device"],
        "n/a" if r["temp_mib"] is None else r["temp_mib"],
        "" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}",
        "" if r["tokens_changed"] is None else f"{r['tokens_changed']:.1%}"] for r in rows]))
  fb = [r for r in rows if r["mode"] == "forward+backward" and r["path"] != "one device"]
  common.save_result("sharding", {
      "machine": common.machine(), "versions": common.versions(),
      "case": {"tokens": n, "experts": e, "hidden": d, "width": i, "top_k": k}, "rows": rows,
      "chart": {"labels": [f"{mesh_text(r['mesh'])}: {r['path']}" for r in fb],
                "values": [r["vs_one_device"] for r in fb], "reference": 1.0,
                "ylabel": "time / one device (forward+backward)",
                "title": "MoE layer on 8 devices: expert parallel vs XLA partitioning"}})


if __name__ == "__main__":
  main()
