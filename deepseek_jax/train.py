"""Train or fine-tune a DeepSeek model: `python -m deepseek_jax.train --preset=tiny_v3 --data=DIR ...`.

Rerunning the same command in the same --workdir resumes from its latest checkpoint (a larger
--steps trains on). Every flag is a field of `TrainConfig` (defined from its fields, so the two
cannot drift apart); the logic lives in `deepseek_jax.trainer.train`.
"""

from __future__ import annotations

from absl import app, flags

from deepseek_jax import cli
from deepseek_jax.train_config import define_flags, flag_specs, from_flag_values
from deepseek_jax.trainer import train

FLAGS = flags.FLAGS

define_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  train(from_flag_values({s.name: FLAGS[s.name].value for s in flag_specs()}))


if __name__ == "__main__":
  cli.run(main, huge_pages=True)
