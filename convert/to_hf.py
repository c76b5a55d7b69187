"""Our Orbax checkpoint (or a trainer workdir) -> the released safetensors layout.

  python -m convert.orbax_to_hf --checkpoint_dir=v3_orbax --output_dir=v3_hf [--max_shard_size=5GB]
      [--fp8] [--overwrite]

Writes shards, `model.safetensors.index.json`, per-expert tensor names, `config.json` and, when the
model has MTP, the MTP layers' copies of the embedding and head. `--fp8` stores the decoder's
projection weights as float8_e4m3fn with float32 `weight_scale_inv` per 128×128 block (the
release's layout) and adds `quantization_config` to config.json. Parameters kept in FP8
(`hf_to_orbax --keep_fp8`) are written back as they are. One parameter is in memory at a time.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from convert import fp8 as fp8_lib
from convert import names
from convert.progress import ProgressBar
from convert.safetensors_io import TensorSpec, write_sharded
from deepseek_jax import checkpoint


class _Source:
  """Our parameters one at a time (partial Orbax reads), or from a dict already in memory."""

  def __init__(self, directory: str):
    self.directory = directory
    self.cfg = checkpoint.read_config(directory)
    self._flat = None
    if os.path.isdir(os.path.join(directory, checkpoint.PARAMS_DIR)):
      self.meta = checkpoint.param_metadata(directory)
    else:  # trainer workdir: restored whole (a training-sized model)
      _, flat = checkpoint.restore_params(directory)
      self._flat = {k: np.asarray(v) for k, v in flat.items()}
      self.meta = {k: v for k, v in self._flat.items()}
    self._cache: dict[str, np.ndarray] = {}

  def dtype(self, path: str) -> np.dtype:
    if path not in self.meta:
      raise KeyError(f"{self.directory}: parameter {path!r} is missing")
    return np.dtype(self.meta[path].dtype)

  def get(self, path: str) -> np.ndarray:
    """One parameter; the last two read stay cached (a weight and its FP8 scales)."""
    if path not in self._cache:
      if len(self._cache) >= 2:
        del self._cache[next(iter(self._cache))]  # release before reading the next
      if self._flat is not None:
        self._cache[path] = self._flat[path]
      else:
        self._cache[path] = checkpoint.read_params_numpy(self.directory, [path])[path]
    return self._cache[path]


def export(checkpoint_dir: str | os.PathLike, output_dir: str | os.PathLike, *,
           max_shard_size: str | int = "5GB", fp8: bool = False,
           block: tuple[int, int] = fp8_lib.DEFAULT_BLOCK, overwrite: bool = False,
           show_progress: bool = False) -> list[str]:
  """Writes the released layout of our checkpoint to `output_dir` (atomically); returns shards."""
  src = _Source(os.path.abspath(os.fspath(checkpoint_dir)))
  cfg = src.cfg
  entries = names.entries(cfg)
  for e in entries:
    src.dtype(e.ours)  # every parameter is there before anything is written
    shape = tuple(src.meta[e.ours].shape)
    if shape != e.shape:
      raise ValueError(f"{checkpoint_dir}: parameter {e.ours!r} has shape {shape}, the config "
                       f"needs {e.shape}")
  copies = names.mtp_copies(cfg) if cfg.num_nextn_predict_layers else []
  kept = {e.ours for e in entries if e.ours + fp8_lib.SCALE_SUFFIX in src.meta}

  specs: list[TensorSpec] = []
  source: dict[str, tuple[names.Entry, int, str]] = {}  # hf name -> (entry, expert, kind)
  for e in entries + copies:
    dt = src.dtype(e.ours)
    for i, name in enumerate(e.hf):
      shape = e.hf_shape()
      if e.ours in kept or (fp8 and fp8_lib.is_quantized_name(name) and len(shape) == 2):
        specs.append(TensorSpec(name, fp8_lib.FP8, shape))
        specs.append(TensorSpec(fp8_lib.scale_name(name), np.dtype(np.float32),
                                fp8_lib.scale_shape(shape, block)))
        source[name] = (e, i, "fp8")
        source[fp8_lib.scale_name(name)] = (e, i, "scale")
      else:
        specs.append(TensorSpec(name, dt, shape))
        source[name] = (e, i, "plain")

  quantized: dict[str, tuple[np.ndarray, np.ndarray]] = {}

  def hf_tensor(e: names.Entry, i: int) -> np.ndarray:
    value = src.get(e.ours)
    return value[i] if e.transform == names.EXPERTS else value

  def produce(spec: TensorSpec) -> np.ndarray:
    e, i, kind = source[spec.name]
    if kind == "plain":
      return np.ascontiguousarray(_to_hf(e, hf_tensor(e, i))).astype(spec.dtype, copy=False)
    if e.ours in kept:  # FP8 kept since the import: written back as stored
      if kind == "fp8":
        return np.ascontiguousarray(_to_hf(e, hf_tensor(e, i)))
      scales = src.get(e.ours + fp8_lib.SCALE_SUFFIX)
      scales = scales[i] if e.transform == names.EXPERTS else scales
      return np.ascontiguousarray(_to_hf(e, scales)).astype(np.float32)
    weight_name = e.hf[i]
    if weight_name not in quantized:
      quantized.clear()
      quantized[weight_name] = fp8_lib.quantize(_to_hf(e, hf_tensor(e, i)), block)
    w, s = quantized[weight_name]
    return w if kind == "fp8" else s

  hf_config: dict[str, Any] = cfg.to_hf()
  main_dtype = src.dtype("embed_tokens.embedding")
  hf_config["torch_dtype"] = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}.get(
      main_dtype, "bfloat16")
  if fp8 or kept:
    hf_config["quantization_config"] = fp8_lib.quantization_config(block)
  bar = ProgressBar(len(specs), sum(s.nbytes for s in specs), enabled=show_progress)
  files = write_sharded(output_dir, specs, produce, max_shard_size=max_shard_size,
                        overwrite=overwrite,
                        extra_files={"config.json": json.dumps(hf_config, indent=2)},
                        on_tensor=lambda s: bar.update(s.nbytes))
  bar.close()
  return files


def _to_hf(e: names.Entry, value: np.ndarray) -> np.ndarray:
  """One released tensor from our array (for experts: one expert's slice, already indexed)."""
  return value if e.transform == names.COPY else value.T
