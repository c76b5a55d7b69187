"""`python -m deepseek_jax.sharding.plan`: the memory plan of a model on a mesh (see sharding/memory.py).

  python -m deepseek_jax.sharding.plan --preset=deepseek_v3 --mesh=fsdp=-1,expert=4 --batch=512 \
      --seq_len=4096 --train --device=v5p-512
  python -m deepseek_jax.sharding.plan --preset=deepseek_v3 --mesh=fsdp=-1,expert=4 --batch=64 \
      --seq_len=4096 --device=v6e-64                     # inference
With a slice size in --device (v5p-512: 256 chips), one --mesh axis may be -1 (the rest).
"""

from __future__ import annotations

import math

from absl import flags

from deepseek_jax import cli
from deepseek_jax.config import DeepseekConfig
from deepseek_jax.presets import get_preset
from deepseek_jax.sharding.memory import DEVICE_MEMORY, GiB, device_memory, memory_plan, slice_devices
from deepseek_jax.sharding.mesh import parse_mesh, resolve_sizes
from deepseek_jax.sharding.rules import parse_rules

flags.DEFINE_string("preset", "deepseek_v3", "model preset")
flags.DEFINE_string("config_json", None, "a config.json (file or directory) instead of --preset")
flags.DEFINE_string("mesh", "fsdp=64,expert=4", "axis sizes; one may be -1 with a sized --device")
flags.DEFINE_integer("batch", 256, "sequences per step (global)", lower_bound=1)
flags.DEFINE_integer("seq_len", 4096, "tokens per sequence", lower_bound=1)
flags.DEFINE_bool("train", False, "training (gradients, AdamW state) rather than inference")
flags.DEFINE_integer("param_bytes", 2, "bytes per stored parameter (2: bfloat16, 1: fp8)",
                     lower_bound=1, upper_bound=4)
flags.DEFINE_string("device", None, f"one of {sorted(DEVICE_MEMORY)}, optionally with the slice "
                    "size (v5p-256: TPU names count cores); default: all, no size")
flags.DEFINE_string("device_memory", None, "memory per device instead, e.g. 95GiB or 80GB")
flags.DEFINE_string("rules", "", "rule overrides, e.g. experts=expert,embed=fsdp")
flags.DEFINE_integer("lora_rank", 0, "LoRA fine-tuning of a frozen base with adapters of this "
                     "rank (with --train: gradients and AdamW state for the adapters only)")
flags.DEFINE_enum("weight_quant", "none", ["none", "int8", "fp8"],
                  "the frozen base stored quantized (with --lora_rank)")
FLAGS = flags.FLAGS


def resolve_mesh(text: str, device: str | None) -> dict[str, int]:
  """--mesh sizes, a -1 axis filled from --device's slice size; checks the product."""
  sizes = parse_mesh(text)
  count = slice_devices(device) if device else None
  if count is None:
    if -1 in sizes.values():
      raise ValueError(f"--mesh={text}: a -1 axis needs a device count, e.g. --device=v5p-256")
    return sizes
  return resolve_sizes(sizes, count)


def main(argv) -> None:
  del argv
  f = FLAGS
  cfg = DeepseekConfig.from_hf(f.config_json) if f.config_json else get_preset(f.preset)
  sizes = resolve_mesh(f.mesh, f.device)
  p = memory_plan(cfg, sizes, f.batch, f.seq_len, training=f.train, param_bytes=f.param_bytes,
                  lora_rank=f.lora_rank, weight_quant=f.weight_quant,
                  rules=parse_rules(f.rules) if f.rules else None)
  mode = "training" if f.train else "inference"
  if f.lora_rank:
    base = f.weight_quant if f.weight_quant != "none" else f"{f.param_bytes}-byte"
    mode = f"LoRA rank {f.lora_rank} {mode}, base {base}"
  print(mode + f", batch {f.batch} x {f.seq_len} tokens")
  print(p.table())
  if f.device_memory:
    targets = [f.device_memory]
  else:
    targets = [f.device] if f.device else sorted(DEVICE_MEMORY)
  for d in targets:
    print(f"  fits {d} ({device_memory(d) / GiB:.0f} GiB, {math.prod(sizes.values())} devices): "
          f"{'yes' if p.fits(d) else 'no'}")


if __name__ == "__main__":
  cli.run(main, cpu_only=True)
