"""MaxText on the shared tiny DeepSeek-V3 config: forward and AdamW training step times on CPU.

Runs inside MaxText's own venv (bench/.peers/maxtext, made by bench/peers/envs.py), never ours.
Training goes through MaxText's own CLI (`python -m maxtext.trainers.pre_train.train base.yml
key=value ...`) on its synthetic data, and the step time is the one MaxText logs for each step
("completed step: N, seconds: S"), median over the steps after the first three (compilation and
the first asynchronous steps). The forward pass uses its public Python API
(`pyconfig.initialize` + `model_creation_utils.from_config`), jitted, median of several calls.

CPU settings a user needs (else it does not run, or crawls): `skip_jax_distributed_system=true`,
`hardware=cpu`, and a MoE path other than the default Pallas megablox GMM, which runs interpreted
on CPU (~10 s a step): `sparse_matmul=false` (dense MoE) or `megablox=false` (jax.lax.ragged_dot).
Everything else is MaxText's default (including `remat_policy=full`); one extra variant tries its
fastest documented remat policy.

  bench/.peers/maxtext/bin/python bench/peers/maxtext_bench.py [--config tiny_v3_bench.json]
      [--variants dense,ragged,dense_remat_min]
Prints one line `PEER_RESULT {json}`.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu (pulled by maxtext[tpu]) probes for a TPU

import peer_common  # noqa: E402

# Variant name -> the MaxText flags that select it.
VARIANTS = {
    "dense": ["sparse_matmul=false"],
    "ragged": ["megablox=false"],
    "dense_remat_min": ["sparse_matmul=false", "remat_policy=minimal_with_context"],
}
SKIP_STEPS = 3  # steps whose logged time is compilation or not yet steady


def model_flags(hf: dict) -> list[str]:
  """The shared HF-style config as MaxText `key=value` overrides of its deepseek3-tiny model."""
  rs = hf.get("rope_scaling") or {}
  flags = {
      "model_name": "deepseek3-tiny", "override_model_config": "true",
      "base_emb_dim": hf["hidden_size"], "base_num_query_heads": hf["num_attention_heads"],
      "base_num_kv_heads": hf["num_key_value_heads"], "base_mlp_dim": hf["intermediate_size"],
      "base_moe_mlp_dim": hf["moe_intermediate_size"],
      "base_num_decoder_layers": hf["num_hidden_layers"],
      "first_num_dense_layers": hf["first_k_dense_replace"], "vocab_size": hf["vocab_size"],
      "num_experts": hf["n_routed_experts"], "num_experts_per_tok": hf["num_experts_per_tok"],
      "shared_experts": hf["n_shared_experts"], "n_routing_groups": hf["n_group"],
      "topk_routing_group": hf["topk_group"], "routed_scaling_factor": hf["routed_scaling_factor"],
      "q_lora_rank": hf["q_lora_rank"], "kv_lora_rank": hf["kv_lora_rank"],
      "qk_nope_head_dim": hf["qk_nope_head_dim"], "qk_rope_head_dim": hf["qk_rope_head_dim"],
      "v_head_dim": hf["v_head_dim"], "normalization_layer_epsilon": hf["rms_norm_eps"],
      "rope_max_timescale": int(hf["rope_theta"]),
      "max_position_embeddings": hf["max_position_embeddings"],
      "mtp_num_layers": hf.get("num_nextn_predict_layers", 0),
  }
  if rs:
    flags.update(original_max_position_embeddings=rs["original_max_position_embeddings"],
                 rope_factor=rs["factor"], beta_fast=rs.get("beta_fast", 32),
                 beta_slow=rs.get("beta_slow", 1), mscale=rs.get("mscale", 1.0))
  if hf.get("tie_word_embeddings"):
    flags["logits_via_embedding"] = "true"
  return [f"{k}={v}" for k, v in flags.items()]


def run_flags(doc: dict, outdir: str, run_name: str, steps: int) -> list[str]:
  """Batch, sequence, dtype, optimizer and the CPU settings."""
  opt = doc["optimizer"]
  flags = {
      "run_name": run_name, "base_output_directory": outdir,
      "per_device_batch_size": doc["batch_size"], "max_target_length": doc["seq_len"],
      "dataset_type": "synthetic", "steps": steps, "dtype": "float32", "weight_dtype": "float32",
      "enable_checkpointing": "false", "enable_tensorboard": "false", "log_config": "false",
      "skip_jax_distributed_system": "true", "hardware": "cpu", "enable_dropout": "false",
      "opt_type": "adamw", "learning_rate": opt["learning_rate"], "adam_b1": opt["b1"],
      "adam_b2": opt["b2"], "adam_eps": opt["eps"], "adam_weight_decay": opt["weight_decay"],
      "gradient_clipping_threshold": opt["clip_norm"],
  }
  return [f"{k}={v}" for k, v in flags.items()]


def base_yml() -> str:
  import maxtext
  return os.path.join(os.path.dirname(maxtext.__file__), "configs", "base.yml")


_STEP = re.compile(r"completed step: (\d+), seconds: ([0-9.]+).*?loss: ([0-9.naif]+)")


def train(doc: dict, variant: str, outdir: str, timeout_s: float) -> dict:
  """Runs MaxText's training CLI; the median of its own per-step times after SKIP_STEPS."""
  steps = SKIP_STEPS + doc["timing"]["repeats"] + 2
  argv = ([sys.executable, "-m", "maxtext.trainers.pre_train.train", base_yml()]
          + model_flags(doc["hf_config"]) + run_flags(doc, outdir, f"bench_{variant}", steps)
          + VARIANTS[variant])
  t0 = time.time()
  p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
  log = p.stdout + p.stderr
  with open(os.path.join(outdir, f"train_{variant}.log"), "w") as f:
    f.write(log)
  by_step = {int(s): (float(t), l) for s, t, l in _STEP.findall(log)}  # a line may be logged twice
  parsed = [(s, t, l) for s, (t, l) in sorted(by_step.items())]
  cmd = "python -m maxtext.trainers.pre_train.train <maxtext>/configs/base.yml " + " ".join(
      argv[4:])
  if p.returncode != 0 or len(parsed) < steps:
    tail = [l for l in log.splitlines() if l.strip()][-8:]
    raise RuntimeError(f"MaxText train exited {p.returncode} after {len(parsed)}/{steps} steps: "
                       + " | ".join(tail))
  times = [t for s, t, _ in parsed if s >= SKIP_STEPS]
  times.sort()
  return {"train_ms": 1e3 * times[len(times) // 2], "train_steps_ms": [1e3 * t for s, t, _ in parsed],
          "losses": [l for _, _, l in parsed], "train_wall_s": time.time() - t0, "train_command": cmd}


def forward(doc: dict, variant: str, outdir: str) -> dict:
  """Jitted forward (logits) through MaxText's public model API, median of `repeats` calls."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from maxtext.configs import pyconfig
  from maxtext.utils import maxtext_utils, model_creation_utils
  argv = (["maxtext_bench", base_yml()] + model_flags(doc["hf_config"])
          + run_flags(doc, outdir, f"fwd_{variant}", 1) + VARIANTS[variant])
  config = pyconfig.initialize(argv)
  mesh = maxtext_utils.get_mesh_from_config(config)
  b, t = doc["batch_size"], doc["seq_len"]
  with jax.set_mesh(mesh):
    model = model_creation_utils.from_config(config, mesh=mesh,
                                             rngs=nnx.Rngs(params=0, dropout=1, aqt=2))
    graphdef, state = nnx.split(model)
    ids = jax.random.randint(jax.random.key(0), (b, t), 0, doc["hf_config"]["vocab_size"])
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    seg = jnp.ones((b, t), jnp.int32)

    @jax.jit
    def fwd(state, ids):
      return nnx.merge(graphdef, state)(ids, pos, seg, enable_dropout=False)

    logits = fwd(state, ids)
    if logits.shape != (b, t, doc["hf_config"]["vocab_size"]):
      raise RuntimeError(f"MaxText forward returned shape {logits.shape}")
    r = peer_common.median_seconds(lambda: fwd(state, ids), warmup=doc["timing"]["warmup"],
                                   repeats=doc["timing"]["repeats"], sync=jax.block_until_ready)
  return {"forward_ms": 1e3 * r["median_s"], "forward_all_ms": [1e3 * s for s in r["all_s"]]}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--config", default=peer_common.DEFAULT_CONFIG)
  ap.add_argument("--variants", default=",".join(VARIANTS))
  ap.add_argument("--train_timeout_s", type=float, default=300)
  args = ap.parse_args()
  doc = peer_common.load_config(args.config)
  tokens = doc["batch_size"] * doc["seq_len"]
  out = {"peer": "maxtext",
         "versions": peer_common.versions(("maxtext", "jax", "jaxlib", "flax", "optax")),
         "batch": [doc["batch_size"], doc["seq_len"]], "variants": {}}
  import jax
  out["devices"] = [str(d) for d in jax.devices()]
  with tempfile.TemporaryDirectory(prefix="maxtext_bench_") as outdir:
    for v in args.variants.split(","):
      res = {"flags": VARIANTS[v]}
      try:
        res.update(train(doc, v, outdir, args.train_timeout_s))
        res["train_tokens_per_s"] = tokens / (res["train_ms"] / 1e3)
        res.update(forward(doc, v, outdir))
        res["forward_tokens_per_s"] = tokens / (res["forward_ms"] / 1e3)
      except Exception as e:  # reported, never hidden: the caller prints the reason
        res["error"] = f"{type(e).__name__}: {e}"[:2000]
      out["variants"][v] = res
  ok = {k: r for k, r in out["variants"].items() if "train_ms" in r}
  out["best"] = min(ok, key=lambda k: ok[k]["train_ms"]) if ok else None
  peer_common.emit(out)


if __name__ == "__main__":
  main()
