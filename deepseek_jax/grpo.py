"""GRPO with verifiable rewards: `python -m deepseek_jax.grpo --init_from=DIR --prompts=tasks.jsonl
--reward=math --group_size=8 --workdir=W ...`.

Prompt rows are JSONL objects `{"prompt": "...", "answer": "..."}` (other fields reach the rewards
as columns, e.g. "tests" for --reward=code). Rerunning the same command in the same --workdir
resumes from its latest checkpoint. Every flag is a field of `GRPOConfig` (defined from its
fields); the logic lives in `deepseek_jax.grpo_trainer.run`. Bad flags and inputs stop with one
line (`cli.run`).
"""

from __future__ import annotations

from absl import app, flags

from deepseek_jax import cli
from deepseek_jax.grpo_config import GRPOConfig
from deepseek_jax.grpo_trainer import run
from deepseek_jax.train_config import define_flags, flag_specs, from_flag_values

FLAGS = flags.FLAGS

define_flags(GRPOConfig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run(from_flag_values({s.name: FLAGS[s.name].value for s in flag_specs(GRPOConfig)},
                       GRPOConfig))


if __name__ == "__main__":
  cli.run(main)
