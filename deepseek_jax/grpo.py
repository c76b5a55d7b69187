"""GRPO with verifiable rewards: `python -m deepseek_jax.grpo --init_from=DIR --prompts=tasks.jsonl
--reward=math --group_size=8 --workdir=W ...`.

Prompt rows are JSONL objects `{"prompt": "...", "answer": "..."}` (other fields reach the rewards
as columns, e.g. "tests" for --reward=code). Rerunning the same command in the same --workdir
resumes from its latest checkpoint. Every flag is a field of `GRPOConfig` (defined from its
fields); the logic lives in `deepseek_jax.grpo_trainer.run`.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from deepseek_jax.grpo_config import GRPOConfig
from deepseek_jax.grpo_trainer import run
from deepseek_jax.train_config import flag_specs, from_flag_values

FLAGS = flags.FLAGS

for _spec in flag_specs(GRPOConfig):
  if _spec.kind == "enum":
    flags.DEFINE_enum(_spec.name, _spec.default, list(_spec.choices), _spec.help,
                      required=_spec.required)
  else:
    getattr(flags, f"DEFINE_{_spec.kind}")(_spec.name, _spec.default, _spec.help,
                                           required=_spec.required)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
  values = {s.name: FLAGS[s.name].value for s in flag_specs(GRPOConfig)}
  try:
    gc = from_flag_values(values, GRPOConfig)
    run(gc)
  except (ValueError, FileNotFoundError) as e:  # bad flags or input files: one line, no trace
    sys.exit(f"deepseek_jax.grpo: {e}")


if __name__ == "__main__":
  app.run(main)
