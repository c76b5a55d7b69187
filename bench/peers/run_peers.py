"""MaxText and EasyDeL on the shared tiny DeepSeek-V3 config, each from its own virtual environment.

Called from our .venv. For each peer: make (or reuse) its venv with bench/peers/envs.py (pinned
PyPI installs, logged under bench/.peers/), run its benchmark script there in a subprocess with a
timeout, and collect the one JSON line it prints. A peer that cannot be installed or run is
reported with the reason (pip's error, the exception, the timeout), never dropped.

  python bench/peers/run_peers.py [--config bench/peers/tiny_v3_bench.json] [--quick]

Importable: `run_peers(config_path) -> dict` (bench/run_all.py).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import envs  # noqa: E402
import peer_common  # noqa: E402

# peer -> (script, all variants, quick variants, timeout of the benchmark run in seconds). Worst
# case, installs (600 s, in parallel) + both runs stay under run_all's 1500 s for this benchmark.
PEERS = {
    "maxtext": ("maxtext_bench.py", "dense,ragged,dense_remat_min", "dense,ragged", 480),
    "easydel": ("easydel_bench.py", "fused_moe,dense_moe", "fused_moe", 360),
}


def _run_one(name: str, env: dict, config_path: str, quick: bool) -> dict:
  script, full, fast, timeout = PEERS[name]
  argv = [env["python"], os.path.join(HERE, script), "--config", config_path,
          "--variants", fast if quick else full]
  shown = (f"bench/.peers/{name}/bin/python bench/peers/{script} --config "
           f"{os.path.relpath(config_path, ROOT)} --variants {argv[-1]}")
  out = {"command": shown}
  t0 = time.time()
  penv = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH="")  # nothing of ours leaks in
  try:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=penv)
  except subprocess.TimeoutExpired:
    return dict(out, error=f"benchmark timed out after {timeout} s", bench_s=time.time() - t0)
  out["bench_s"] = time.time() - t0
  lines = [l for l in p.stdout.splitlines() if l.startswith(peer_common.REPORT_PREFIX)]
  if p.returncode != 0 or not lines:
    tail = [l for l in (p.stderr or p.stdout).splitlines() if l.strip()][-10:]
    return dict(out, error=f"exited {p.returncode} without a result: " + " | ".join(tail))
  out["result"] = json.loads(lines[-1][len(peer_common.REPORT_PREFIX):])
  return out


def run_peers(config_path: str = peer_common.DEFAULT_CONFIG, *, quick: bool = False,
              peers: tuple[str, ...] = tuple(PEERS)) -> dict:
  """Ensures each peer's venv, runs its benchmark, returns {peer: {"env", "command", "result" |
  "error"}}; `result` is the peer script's JSON (versions, and per variant forward_ms, train_ms,
  tokens/s or an `error`, plus `best`)."""
  config_path = os.path.abspath(config_path)
  peer_common.load_config(config_path)  # fail here, not in every peer, on a bad config
  # Installs are network and disk bound: both at once. Benchmarks compete for the CPU: in turn.
  with concurrent.futures.ThreadPoolExecutor(len(peers)) as pool:
    made = dict(zip(peers, pool.map(envs.ensure_env, peers)))
  report = {}
  for name in peers:
    env = made[name]
    if not env["ok"]:
      report[name] = {"env": env, "error": f"install failed: {env['error']}"}
      continue
    report[name] = dict(_run_one(name, env, config_path, quick), env=env)
  return report


def measure_ours(config_path: str, quick: bool = False) -> dict:
  """Our forward and train step (CPU default dispatch) on the same config, timed as the peers'
  scripts time theirs (the config's warmup and repeats, median), in this process right after
  them."""
  import jax
  import numpy as np
  from flax import nnx

  from bench import train as train_bench
  from deepseek_jax import DeepseekConfig
  from deepseek_jax.model import DeepseekForCausalLM
  doc = peer_common.load_config(config_path)
  cfg = DeepseekConfig.from_hf(doc["hf_config"])
  b, t = doc["batch_size"], doc["seq_len"]
  timing = doc["timing"]
  reps = 3 if quick else timing["repeats"]
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (b, t + 1)).astype(np.int32)
  model = DeepseekForCausalLM(cfg, rngs=nnx.Rngs(0))
  fwd = jax.jit(lambda m, x: m(x))
  x = jax.numpy.asarray(tokens[:, :-1])
  f = peer_common.median_seconds(lambda: fwd(model, x), warmup=timing["warmup"], repeats=reps,
                                 sync=jax.block_until_ready)
  step = train_bench.ours("auto", tokens, cfg)  # the platform default (capacity on CPU)
  s = peer_common.median_seconds(step, warmup=timing["warmup"], repeats=reps,
                                 sync=jax.block_until_ready)
  return {"forward_ms": f["median_s"] * 1e3, "train_ms": s["median_s"] * 1e3,
          "train_tokens_per_s": b * t / s["median_s"]}


def rows(report: dict) -> list[list]:
  """One table row per peer variant: peer, variant, forward ms, train ms, train tokens/s."""
  out = []
  for name, r in report.items():
    if "result" not in r:
      out.append([name, "-", "-", "-", "-", f"not run: {r['error']}"])
      continue
    res = r["result"]
    for v, x in res["variants"].items():
      label = v + (" (best)" if v == res.get("best") else "")
      if "error" in x:
        out.append([name, label, "-", "-", "-", f"failed: {x['error'][:300]}"])
      else:
        out.append([name, label, x["forward_ms"], x["train_ms"], x["train_tokens_per_s"], ""])
  return out


def speedups(report: dict, ours: dict) -> list[list]:
  """Our training tokens/s over each peer's best variant's (the 2x target)."""
  out = []
  for name, r in report.items():
    res = r.get("result", {})
    best = res.get("variants", {}).get(res.get("best") or "", {})
    if "train_tokens_per_s" in best:
      out.append([name, res["best"], ours["train_tokens_per_s"] / best["train_tokens_per_s"]])
    else:
      out.append([name, "-", "not measured"])
  return out


def markdown(report: dict, config_path: str, ours: dict | None = None) -> str:
  from bench import common
  with open(config_path) as f:
    doc = json.load(f)
  hf = doc["hf_config"]
  head = (f"Same config on every side (`{os.path.relpath(config_path, ROOT)}`): hidden "
          f"{hf['hidden_size']}, {hf['num_hidden_layers']} layers ({hf['first_k_dense_replace']} "
          f"dense), {hf['n_routed_experts']} experts top-{hf['num_experts_per_tok']} + "
          f"{hf['n_shared_experts']} shared, MLA, vocab {hf['vocab_size']}, batch "
          f"{doc['batch_size']} x {doc['seq_len']}, float32, AdamW + clip. Each peer runs from its "
          "own venv under bench/.peers/, installed from PyPI by the benchmark.")
  table = rows(report)
  if ours is not None:
    table.insert(0, ["deepseek-jax (ours)", "auto (platform default)", ours["forward_ms"],
                     ours["train_ms"], ours["train_tokens_per_s"], "measured after the peers"])
  lines = [head, "", common.table(["peer", "variant", "forward ms", "train ms / step",
                                   "train tokens/s", "note"], table), ""]
  if ours is not None:
    lines += ["Our training tokens/s over each peer's best variant (target: at least 2x):", "",
              common.table(["peer", "its best variant", "ours / peer"], speedups(report, ours)),
              ""]
  for name, r in report.items():
    env = r["env"]
    vers = r.get("result", {}).get("versions", {})
    how = (f"venv reused; its install took {env.get('install_s', 0):.0f} s" if env.get("reused")
           else f"installed now in {env.get('install_s', 0):.0f} s")
    lines.append(f"- {name}: `pip install {env['spec']}` (Python {vers.get('python', '?')}, "
                 f"{how}; log `{os.path.relpath(env['log'], ROOT)}`); versions "
                 + ", ".join(f"{k} {v}" for k, v in vers.items() if k != "python")
                 + (f"; command `{r['command']}`" if "command" in r else ""))
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--config", default=peer_common.DEFAULT_CONFIG)
  ap.add_argument("--quick", action="store_true", help="only each peer's default-fastest variants")
  args = ap.parse_args()
  report = run_peers(args.config, quick=args.quick)
  ours = measure_ours(os.path.abspath(args.config), args.quick)
  md = markdown(report, os.path.abspath(args.config), ours)
  print(md)
  from bench import common
  ok = [["deepseek-jax", "ours", 0, 0, ours["train_tokens_per_s"]]]
  ok += [r for r in rows(report) if isinstance(r[4], float)]
  common.save_result("peers", {
      "config": os.path.relpath(os.path.abspath(args.config), ROOT), "report": report,
      "ours": ours, "markdown": md,
      "chart": {"title": "Peers: training tokens/s, tiny V3, float32 (CPU)",
                "labels": [f"{r[0]} {r[1]}" for r in ok], "values": [r[4] for r in ok],
                "ylabel": "tokens/s"}})


if __name__ == "__main__":
  main()
