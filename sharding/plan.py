"""`python -m sharding.plan`: the memory plan of a model on a mesh (see sharding/memory.py).

  python -m sharding.plan --preset=deepseek_v3 --mesh=fsdp=64,expert=4 --batch=64 \
      --seq_len=4096 --train --device=v5p
"""

from __future__ import annotations

from absl import app, flags

from sharding.memory import DEVICE_MEMORY, GiB, device_memory, plan

flags.DEFINE_string("preset", "deepseek_v3", "model preset")
flags.DEFINE_string("config_json", None, "a config.json (file or directory) instead of --preset")
flags.DEFINE_string("mesh", "fsdp=64,expert=4", "axis sizes (their product is the device count)")
flags.DEFINE_integer("batch", 256, "sequences per step (global)")
flags.DEFINE_integer("seq_len", 4096, "tokens per sequence")
flags.DEFINE_bool("train", False, "training (gradients, AdamW state) rather than inference")
flags.DEFINE_integer("param_bytes", 2, "bytes per stored parameter (2: bfloat16, 1: fp8)")
flags.DEFINE_string("device", None, f"one of {sorted(DEVICE_MEMORY)} (default: all)")
flags.DEFINE_string("rules", "", "rule overrides, e.g. experts=expert,embed=fsdp")
FLAGS = flags.FLAGS


def main(argv) -> None:
  del argv
  from deepseek_jax.config import DeepseekConfig
  from deepseek_jax.presets import get_preset
  from sharding.mesh import parse_mesh
  from sharding.rules import parse_rules
  f = FLAGS
  cfg = DeepseekConfig.from_hf(f.config_json) if f.config_json else get_preset(f.preset)
  p = plan(cfg, parse_mesh(f.mesh), f.batch, f.seq_len, training=f.train,
           param_bytes=f.param_bytes, rules=parse_rules(f.rules) if f.rules else None)
  print(("training" if f.train else "inference") + f", batch {f.batch} x {f.seq_len} tokens")
  print(p.table())
  for d in [f.device] if f.device else sorted(DEVICE_MEMORY):
    print(f"  fits {d} ({device_memory(d) / GiB:.0f} GiB): {'yes' if p.fits(d) else 'no'}")


if __name__ == "__main__":
  app.run(main)
