"""Fine-tuning cost: LoRA over a frozen int8 base against full fine-tuning (ours), and against
transformers + peft LoRA, on the same CPU and config.

Config: the mid-size V3 of bench/train.py (hidden 1024, 8 layers, 32 routed experts top-4 of width
512 + 1 shared, MLA 8 heads, vocab 8192), batch 4 x 512, AdamW. Each variant runs in its own
process (so its peak resident memory is its own): it builds the model, then times optimizer
steps (forward, backward, AdamW on what it trains) after one warm-up step.

  ours full      every weight trained, float32 (master weights, gradients, two moments)
  ours LoRA      rank 16 adapters on every attention, MLP and expert projection (the routed
                 experts included), base frozen in int8, adapters float32
  peft LoRA      transformers' DeepseekV3 in float32 with peft rank 16 on every nn.Linear
                 projection; peft cannot adapt transformers' fused routed experts (they are
                 parameters of one module, not nn.Linear layers), so its adapters skip them

  python bench/finetune.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bench import common  # noqa: E402

RANK = 16
VARIANTS = ("ours_full", "ours_lora_int8", "peft_lora")


def _tokens(cfg, b, t):
  import numpy as np
  return np.random.default_rng(0).integers(0, cfg.vocab_size, (b, t + 1)).astype(np.int32)


def _ours(variant: str, steps: int) -> dict:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from bench.train import MID, MID_B, MID_T, TC
  from deepseek_jax import adapters, optim, quant
  from deepseek_jax.layers import LoRAParam
  from deepseek_jax.model import DeepseekForCausalLM
  from deepseek_jax.params import flat_state, model_from_flat, variable_specs
  from deepseek_jax.train_step import make_train_step

  cfg = MID.replace(moe_dispatch="blocked")
  model = DeepseekForCausalLM(cfg, rngs=nnx.Rngs(0))
  if variant == "ours_lora_int8":
    qcfg = cfg.replace(weight_quant="int8")
    flat = quant.quantize_flat(flat_state(model), variable_specs(qcfg), "int8")
    model = adapters.with_adapters(model_from_flat(qcfg, flat, param_dtype=jnp.bfloat16),
                                   rank=RANK)
    trainable = LoRAParam
  else:
    trainable = nnx.Param
  graphdef, params, frozen, rest = nnx.split(model, trainable, nnx.Param, ...)
  tx = optim.make_optimizer(TC.optim_config())
  state = {"params": params, "frozen": frozen, "rest": rest, "opt_state": tx.init(params),
           "step": jnp.zeros((), jnp.int32)}
  step = jax.jit(make_train_step(graphdef, tx, model.cfg, TC), donate_argnums=(0,))
  batch = jnp.asarray(_tokens(cfg, MID_B, MID_T)[None])
  del model
  trained = sum(x.size for x in jax.tree.leaves(state["params"]))
  state, logs = step(state, batch)
  jax.block_until_ready(logs["loss"])
  t0 = time.perf_counter()
  for _ in range(steps):
    state, logs = step(state, batch)
  jax.block_until_ready(logs["loss"])
  return {"seconds": (time.perf_counter() - t0) / steps, "trained": trained,
          "tokens": MID_B * MID_T, "loss": float(logs["loss"])}


def _peft(steps: int) -> dict:
  import numpy as np
  import peft
  import torch
  import transformers

  from bench.train import MID, MID_B, MID_T
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count())
  torch.set_flush_denormal(True)
  model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**MID.to_hf()))
  targets = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj",
             "up_proj", "down_proj"]
  model = peft.get_peft_model(model.float().train(),
                              peft.LoraConfig(r=RANK, lora_alpha=16, target_modules=targets))
  trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                          betas=(0.9, 0.95), weight_decay=0.1)
  ids = torch.from_numpy(_tokens(MID, MID_B, MID_T)[:, :-1].astype(np.int64))

  def one():
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)

  one()
  t0 = time.perf_counter()
  for _ in range(steps):
    loss = one()
  return {"seconds": (time.perf_counter() - t0) / steps, "trained": trained,
          "tokens": MID_B * MID_T, "loss": loss}


def _child(variant: str, steps: int) -> None:
  out = _peft(steps) if variant == "peft_lora" else _ours(variant, steps)
  out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print("RESULT " + json.dumps(out), flush=True)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--quick", action="store_true")
  p.add_argument("--child", choices=VARIANTS)
  p.add_argument("--steps", type=int, default=3)
  args = p.parse_args()
  if args.child:
    return _child(args.child, args.steps)
  steps = 2 if args.quick else args.steps
  results, failed = {}, {}
  for v in VARIANTS:
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", v,
                        f"--steps={steps}"], capture_output=True, text=True, timeout=1800,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if r.returncode or line is None:
      failed[v] = (r.stderr or r.stdout)[-600:]
      continue
    results[v] = json.loads(line[len("RESULT "):])
  names = {"ours_full": "ours, full fine-tuning (float32)",
           "ours_lora_int8": f"ours, LoRA rank {RANK} (int8 base, experts adapted)",
           "peft_lora": f"transformers + peft LoRA rank {RANK} (float32, experts not adapted)"}
  rows = []
  for v, r in results.items():
    rows.append([names[v], r["seconds"] * 1e3, r["tokens"] / r["seconds"], r["trained"],
                 r["peak_rss_mib"]])
  md = [f"Mid-size V3 (bench/train.py), batch 4 x 512, AdamW on what each trains; "
        f"{steps} timed steps after one warm-up, each variant in its own process.", "",
        common.table(["variant", "ms / step", "tokens/s", "trained parameters",
                      "peak RSS (MiB)"], rows)]
  if "ours_lora_int8" in results and "peft_lora" in results:
    ratio = results["peft_lora"]["seconds"] / results["ours_lora_int8"]["seconds"]
    md += ["", f"LoRA speed, ours over transformers + peft: {ratio:.2f}x."]
  for v, err in failed.items():
    md += ["", f"{names[v]}: did not run here: {err.strip().splitlines()[-1] if err else '?'}"]
  print("\n".join(md))
  common.save_result("finetune", {
      "machine": common.machine(), "versions": common.versions(), "results": results,
      "failed": failed, "markdown": "\n".join(md),
      "chart": {"title": "Fine-tuning tokens/s, mid-size V3, batch 4x512 (CPU)",
                "labels": [r[0] for r in rows], "values": [r[2] for r in rows],
                "ylabel": "tokens/s"}})


if __name__ == "__main__":
  main()
