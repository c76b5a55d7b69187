"""Released-layout safetensors (FP8 included) -> our Orbax checkpoint, one tensor at a time.

  python -m deepseek_jax.convert.hf_to_orbax --hf_dir=DeepSeek-V3 --output_dir=v3_orbax [--dtype=bfloat16]

Host memory stays within a few times the largest single parameter whatever the model size: each
parameter is read (FP8 dequantized), converted, handed to an Orbax partial save in a group of at
most G = max(largest parameter, 64 MiB), and released once written.

Three stages overlap: loader threads read and cast the parameters ahead (`load.iter_hf`, at most
G bytes of targets waiting), the next group is gathered, and Orbax writes the previous group in
the background. Host memory is so bounded by about three groups (written, gathered, loaded
ahead) plus the loaders' staging copies. Orbax groups are written one at a time: two partial
saves in flight into one checkpoint fail in orbax-checkpoint 0.12.8 (the second finds no array
metadata of the first's temporary directory).
"""

from __future__ import annotations

import contextlib
import math
import os

import jax.numpy as jnp
import numpy as np

from deepseek_jax import checkpoint
from deepseek_jax.convert.atomic import check_apart
from deepseek_jax.convert.load import LOAD_WORKERS, HFCheckpoint, default_targets, iter_hf
from deepseek_jax.metrics import progress_bar
from deepseek_jax.tokenizer import tokenizer_files

# Orbax partial saves cost ~50 ms each: groups are at least this large (a constant, so memory
# still does not grow with the model).
MIN_GROUP_BYTES = 64 * 2**20


def convert(hf_dir: str | os.PathLike, output_dir: str | os.PathLike, *, dtype=jnp.bfloat16,
            overwrite: bool = False, keep_fp8: bool = False, show_progress: bool = False,
            allow_nonfinite: bool = False, workers: int = LOAD_WORKERS) -> str:
  """Writes our checkpoint of `hf_dir` to `output_dir` (atomically); returns its path.

  Parameters are saved in groups of G = max(largest parameter, MIN_GROUP_BYTES) bytes (target
  dtype), one group written in the background while the next is gathered and up to G more bytes
  are read and cast ahead in threads (`workers`; 1 loads one parameter at a time, the same bits).
  The tokenizer's files (`tokenizer.TOKENIZER_FILES`) are copied along. An `output_dir` that is,
  contains or lies inside `hf_dir` is refused, and so are NaN or Inf weights or FP8 scales,
  named, unless `allow_nonfinite`.
  """
  check_apart(output_dir, {"hf_dir": hf_dir})
  with HFCheckpoint(hf_dir, allow_nonfinite=allow_nonfinite) as ckpt:
    targets = default_targets(ckpt.cfg, dtype)
    largest = max(math.prod(t.shape) * np.dtype(t.dtype).itemsize for t in targets.values())
    total = sum(ckpt.source_bytes(e) for e in ckpt.entries)
    with progress_bar(total, enabled=show_progress, unit="B", unit_scale=True,
                      unit_divisor=1000, desc="hf_to_orbax") as bar:
      group = max(largest, MIN_GROUP_BYTES)
      params = iter_hf(ckpt, targets, keep_fp8=keep_fp8, workers=workers,
                       lookahead_bytes=group if workers > 1 else None,
                       progress=lambda path, nbytes: bar.update(nbytes))
      with contextlib.closing(params):  # an error in the writer stops the loaders at once
        return checkpoint.save_params(output_dir, ckpt.cfg, params, overwrite=overwrite,
                                      group_bytes=group, release=True,
                                      copy_files=tokenizer_files(hf_dir))
