"""EasyDeL on the shared tiny DeepSeek-V3 config: forward and AdamW training step times on CPU.

Runs inside EasyDeL's own venv (bench/.peers/easydel, made by bench/peers/envs.py), never ours.
The model is built from its public API (`easydel.DeepseekV3Config(**hf_config)`,
`easydel.DeepseekV3ForCausalLM(cfg, dtype, param_dtype, rngs)`), float32, and run inside
`with model.mesh:` as EasyDeL requires. The training step is the loop a user writes around it:
`model.compute_loss(input_ids=..., attention_mask=...)` (EasyDeL's own causal-LM loss), the
gradient of the nnx.Param state, optax global-norm clip + AdamW, all under one jax.jit. (EasyDeL's
Trainer adds a data pipeline and checkpointing around the same step; the step is what is timed.)
Variants are EasyDeL's MoE methods (`moe_method`: fused_moe is its default).

  bench/.peers/easydel/bin/python bench/peers/easydel_bench.py [--config tiny_v3_bench.json]
      [--variants fused_moe,dense_moe]
Prints one line `PEER_RESULT {json}`.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import peer_common  # noqa: E402

VARIANTS = ("fused_moe", "dense_moe", "standard_moe")


def build(doc: dict, moe_method: str):
  """EasyDeL's DeepSeek-V3 model from the shared HF config, float32."""
  import easydel as ed
  import jax.numpy as jnp
  from flax import nnx
  hf = {k: v for k, v in doc["hf_config"].items() if k not in ("model_type", "architectures")}
  cfg = ed.DeepseekV3Config(**hf)
  cfg.add_basic_configurations(moe_method=moe_method)
  return ed.DeepseekV3ForCausalLM(cfg, dtype=jnp.float32, param_dtype=jnp.float32,
                                  rngs=nnx.Rngs(0))


def measure(doc: dict, moe_method: str) -> dict:
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx
  b, t, v = doc["batch_size"], doc["seq_len"], doc["hf_config"]["vocab_size"]
  warmup, repeats = doc["timing"]["warmup"], doc["timing"]["repeats"]
  opt = doc["optimizer"]
  model = build(doc, moe_method)
  res = {"moe_method": moe_method, "attn_mechanism": str(model.config.attn_mechanism)}
  ids = jax.random.randint(jax.random.key(0), (b, t), 0, v)
  mask = jnp.ones((b, t), bool)
  with model.mesh:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def fwd(params, rest, ids):
      return nnx.merge(graphdef, params, rest)(input_ids=ids, attention_mask=mask).logits

    logits = fwd(params, rest, ids)
    if logits.shape != (b, t, v):
      raise RuntimeError(f"EasyDeL forward returned shape {logits.shape}")
    r = peer_common.median_seconds(lambda: fwd(params, rest, ids), warmup=warmup,
                                   repeats=repeats, sync=jax.block_until_ready)
    res.update(forward_ms=1e3 * r["median_s"], forward_all_ms=[1e3 * s for s in r["all_s"]])

    tx = optax.chain(optax.clip_by_global_norm(opt["clip_norm"]),
                     optax.adamw(opt["learning_rate"], b1=opt["b1"], b2=opt["b2"],
                                 eps=opt["eps"], weight_decay=opt["weight_decay"]))

    def loss_fn(params, rest, ids):
      _, metrics = nnx.merge(graphdef, params, rest).compute_loss(input_ids=ids,
                                                                  attention_mask=mask)
      return metrics.loss

    @jax.jit
    def step(params, opt_state, rest, ids):
      loss, grads = jax.value_and_grad(loss_fn)(params, rest, ids)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    holder = {"p": params, "o": tx.init(params)}
    losses = []

    def one():
      holder["p"], holder["o"], loss = step(holder["p"], holder["o"], rest, ids)
      losses.append(float(loss))  # blocks on the step
      return loss

    r = peer_common.median_seconds(one, warmup=warmup, repeats=repeats, sync=lambda x: x)
    res.update(train_ms=1e3 * r["median_s"], train_all_ms=[1e3 * s for s in r["all_s"]],
               losses=losses)
  return res


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--config", default=peer_common.DEFAULT_CONFIG)
  ap.add_argument("--variants", default="fused_moe,dense_moe")
  args = ap.parse_args()
  doc = peer_common.load_config(args.config)
  tokens = doc["batch_size"] * doc["seq_len"]
  out = {"peer": "easydel",
         "versions": peer_common.versions(("easydel", "eformer", "ejkernel", "jax", "jaxlib",
                                           "flax", "optax", "torch")),
         "batch": [doc["batch_size"], doc["seq_len"]], "variants": {}}
  import jax
  out["devices"] = [str(d) for d in jax.devices()]
  for v in args.variants.split(","):
    if v not in VARIANTS:
      raise SystemExit(f"--variants: unknown MoE method {v!r}; expected some of {VARIANTS}")
    try:
      res = measure(doc, v)
      res["train_tokens_per_s"] = tokens / (res["train_ms"] / 1e3)
      res["forward_tokens_per_s"] = tokens / (res["forward_ms"] / 1e3)
    except Exception as e:  # reported, never hidden: the caller prints the reason
      res = {"error": f"{type(e).__name__}: {e}"[:2000]}
    out["variants"][v] = res
  ok = {k: r for k, r in out["variants"].items() if "train_ms" in r}
  out["best"] = min(ok, key=lambda k: ok[k]["train_ms"]) if ok else None
  peer_common.emit(out)


if __name__ == "__main__":
  main()
