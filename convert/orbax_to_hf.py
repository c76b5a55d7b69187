"""CLI: our Orbax checkpoint (or a trainer workdir) -> the released layout (see `convert.to_hf`).

  python -m deepseek_jax.convert.orbax_to_hf --checkpoint_dir=v3_orbax --output_dir=v3_hf [--max_shard_size=5GB]
      [--fp8] [--overwrite] [--allow_nonfinite]
"""

from __future__ import annotations

from absl import flags

from deepseek_jax import cli
from deepseek_jax.export_hf import export_any

_CHECKPOINT_DIR = flags.DEFINE_string("checkpoint_dir", None, "Our Orbax checkpoint, a trainer "
                                      "workdir (LoRA adapters merged) or an adapter checkpoint.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where the released layout goes.")
_MAX_SHARD = flags.DEFINE_string("max_shard_size", "5GB", "Largest shard, e.g. 5GB or 500MB.")
_FP8 = flags.DEFINE_bool("fp8", False, "FP8 block quantization of the projection weights.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --output_dir.")
_ALLOW_NONFINITE = flags.DEFINE_bool("allow_nonfinite", False, "Export parameters holding NaN "
                                     "or Inf instead of refusing them.")


def main(argv):
  del argv
  files = export_any(_CHECKPOINT_DIR.value, _OUTPUT_DIR.value, max_shard_size=_MAX_SHARD.value,
                     fp8=_FP8.value, overwrite=_OVERWRITE.value, show_progress=True,
                     allow_nonfinite=_ALLOW_NONFINITE.value)
  print(f"{_OUTPUT_DIR.value}: {len(files)} shard(s)")


if __name__ == "__main__":
  flags.mark_flags_as_required(["checkpoint_dir", "output_dir"])
  cli.run(main)
