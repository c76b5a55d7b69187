"""Any model directory in the released safetensors layout (what `orbax_to_hf` writes).

Our Orbax checkpoints are read one parameter at a time (`convert.to_hf`); a trainer workdir (a
LoRA run comes back with its adapters merged into its base) and an adapter checkpoint go through
`from_pretrained` in float32, and the tokenizer files of the base travel with the weights.
"""

from __future__ import annotations

import os

import jax.numpy as jnp

from deepseek_jax import workdir
from deepseek_jax.convert.atomic import check_apart
from deepseek_jax.convert.to_hf import export
from deepseek_jax.params import flat_state
from deepseek_jax.pretrained import ORBAX, checkpoint_layout, from_pretrained
from deepseek_jax.tokenizer import tokenizer_files


def export_any(checkpoint_dir: str | os.PathLike, output_dir: str | os.PathLike, **kw
               ) -> list[str]:
  """Writes `checkpoint_dir` (any layout `from_pretrained` reads but the released one) to
  `output_dir` in the released layout; returns the shard names. `kw`: `convert.to_hf.export`'s."""
  checkpoint_dir = os.fspath(checkpoint_dir)
  if checkpoint_layout(checkpoint_dir) == ORBAX:
    return export(checkpoint_dir, output_dir, **kw)
  check_apart(output_dir, {"checkpoint_dir": checkpoint_dir})
  model = from_pretrained(checkpoint_dir, dtype=jnp.float32)
  meta = workdir.read_meta(checkpoint_dir) if workdir.is_workdir(checkpoint_dir) else {}
  # The trainer records its tokenizer in the workdir; older workdirs name their base.
  copy_from = (checkpoint_dir if tokenizer_files(checkpoint_dir)
               else meta.get("init_from") or checkpoint_dir)
  return export((model.cfg, flat_state(model)), output_dir, copy_from=copy_from, **kw)
