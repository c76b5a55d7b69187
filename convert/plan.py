"""CLI: the conversion plan of a config.json, touching no weights (see `convert.planner`).

  python -m deepseek_jax.convert.plan --config=DeepSeek-V3/config.json [--dtype=bfloat16]
"""

from __future__ import annotations

from absl import flags

from deepseek_jax import cli
from deepseek_jax.convert.planner import format_plan, make_plan

_CONFIG = flags.DEFINE_string("config", None, "A config.json (or the directory holding it).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"],
                           "Our parameter dtype.")


def main(argv):
  del argv
  print(format_plan(make_plan(_CONFIG.value, dtype=_DTYPE.value)))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  cli.run(main, cpu_only=True)
