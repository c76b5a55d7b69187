"""Train or fine-tune a DeepSeek model: `python -m deepseek_jax.train --preset=tiny_v3 --data=DIR ...`.

Rerunning the same command in the same --workdir resumes from its latest checkpoint (a larger
--steps trains on). The logic lives in `deepseek_jax.trainer.train`; this file only maps flags.
"""

from __future__ import annotations

from absl import app, flags, logging

from deepseek_jax.config import MOE_DISPATCHES
from deepseek_jax.trainer import TrainConfig, train

_D = TrainConfig()
FLAGS = flags.FLAGS

flags.DEFINE_string("preset", None, "Model preset name (deepseek_jax.presets).")
flags.DEFINE_string("config_json", None, "Hugging Face style config.json (file or directory).")
flags.DEFINE_string("init_from", None, "Released safetensors directory or a trainer workdir.")
flags.DEFINE_string("data", None, "Text files or directories, comma-separated.", required=True)
flags.DEFINE_list("data_patterns", list(_D.data_patterns), "File patterns searched in directories.")
flags.DEFINE_list("data_exclude", list(_D.data_exclude), "Directory names never entered.")
flags.DEFINE_integer("max_data_bytes", None, "Cap on the corpus size in bytes.")
flags.DEFINE_string("tokenizer", _D.tokenizer, "'byte', a tokenizer.json, or a directory with one.")
flags.DEFINE_integer("seq_len", _D.seq_len, "Tokens per sequence.")
flags.DEFINE_integer("batch_size", _D.batch_size, "Sequences per optimizer step.")
flags.DEFINE_integer("grad_accum", _D.grad_accum, "Micro-batches per step.")
flags.DEFINE_integer("steps", _D.steps, "Train until this step.")
flags.DEFINE_integer("decay_steps", None, "Cosine schedule length (default: --steps).")
flags.DEFINE_float("learning_rate", _D.learning_rate, "Peak learning rate.")
flags.DEFINE_integer("warmup_steps", _D.warmup_steps, "Linear warmup steps.")
flags.DEFINE_float("min_lr_ratio", _D.min_lr_ratio, "Final learning rate / peak.")
flags.DEFINE_float("weight_decay", _D.weight_decay, "AdamW weight decay (matrices only).")
flags.DEFINE_float("clip_norm", _D.clip_norm, "Global gradient-norm clip (<= 0: off).")
flags.DEFINE_float("mtp_weight", _D.mtp_weight, "Weight λ of the MTP loss.")
flags.DEFINE_float("bias_update_speed", _D.bias_update_speed,
                   "γ of auxiliary-loss-free balancing (0: off).")
flags.DEFINE_float("seq_aux_alpha", _D.seq_aux_alpha, "α of the sequence-wise balance loss.")
flags.DEFINE_float("expert_aux_alpha", None,
                   "α of DeepSeek-V2's expert-level balance loss (default: from the config, "
                   "off for noaux_tc routing).")
flags.DEFINE_integer("data_parallel", _D.data_parallel, "Data-parallel mesh axis (-1: the rest).")
flags.DEFINE_integer("fsdp", _D.fsdp, "FSDP mesh axis.")
flags.DEFINE_integer("expert", _D.expert, "Expert-parallel mesh axis.")
flags.DEFINE_integer("tensor", _D.tensor, "Tensor-parallel mesh axis.")
flags.DEFINE_bool("remat", _D.remat, "Recompute layer activations in the backward pass.")
flags.DEFINE_enum("compute_dtype", _D.compute_dtype, ["float32", "bfloat16"],
                  "Compute dtype (parameters stay float32).")
flags.DEFINE_enum("moe_dispatch", None, list(MOE_DISPATCHES),
                  "Override the config's MoE dispatch.")
flags.DEFINE_bool("scan_layers", None, "Override the config's scan_layers.")
flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and TensorBoard files.",
                    required=True)
flags.DEFINE_integer("save_every", _D.save_every, "Checkpoint period in steps.")
flags.DEFINE_integer("keep", _D.keep, "Checkpoints kept.")
flags.DEFINE_integer("log_every", _D.log_every, "Metrics period in steps.")
flags.DEFINE_integer("seed", _D.seed, "Initialisation and data-order seed.")
flags.DEFINE_float("peak_flops", None, "Per-device peak FLOP/s for MFU.")
flags.DEFINE_bool("progress", None, "Progress bar (default: on a terminal).")
flags.DEFINE_bool("tensorboard", _D.tensorboard, "Also write TensorBoard event files.")


def config_from_flags() -> TrainConfig:
  """The TrainConfig the parsed flags describe (one flag per field)."""
  kw = {}
  for name in TrainConfig.__dataclass_fields__:
    value = getattr(FLAGS, name)
    kw[name] = tuple(value) if name in ("data_patterns", "data_exclude") else value
  return TrainConfig(**kw)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
  train(config_from_flags())


if __name__ == "__main__":
  app.run(main)
