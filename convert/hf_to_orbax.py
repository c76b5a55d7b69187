"""CLI: released-layout safetensors (FP8 included) -> our Orbax checkpoint (see `convert.to_orbax`).

  python -m deepseek_jax.convert.hf_to_orbax --hf_dir=DeepSeek-V3 --output_dir=v3_orbax [--dtype=bfloat16]
      [--overwrite] [--keep_fp8] [--allow_nonfinite]
"""

from __future__ import annotations

from absl import flags

from deepseek_jax import cli
from deepseek_jax.convert.to_orbax import convert
from deepseek_jax.dtypes import BY_NAME

_HF_DIR = flags.DEFINE_string("hf_dir", None, "Released-layout directory (config.json + safetensors).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where our Orbax checkpoint goes.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", list(BY_NAME), "Parameter dtype.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --output_dir.")
_KEEP_FP8 = flags.DEFINE_bool("keep_fp8", False, "Keep FP8 weights with their block scales.")
_ALLOW_NONFINITE = flags.DEFINE_bool("allow_nonfinite", False, "Convert weights or FP8 scales "
                                     "holding NaN or Inf instead of refusing them.")


def main(argv):
  del argv
  out = convert(_HF_DIR.value, _OUTPUT_DIR.value, dtype=BY_NAME[_DTYPE.value],
                overwrite=_OVERWRITE.value, keep_fp8=_KEEP_FP8.value, show_progress=True,
                allow_nonfinite=_ALLOW_NONFINITE.value)
  print(out)


if __name__ == "__main__":
  flags.mark_flags_as_required(["hf_dir", "output_dir"])
  cli.run(main)
