"""Our Orbax checkpoint (or a trainer workdir) -> the released safetensors layout.

  python -m deepseek_jax.convert.orbax_to_hf --checkpoint_dir=v3_orbax --output_dir=v3_hf [--max_shard_size=5GB]
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

from deepseek_jax import checkpoint
from deepseek_jax.config import DeepseekConfig
from deepseek_jax.convert import fp8 as fp8_lib
from deepseek_jax.convert import names
from deepseek_jax.convert.atomic import check_apart
from deepseek_jax.convert.safetensors_write import TensorSpec, write_sharded
from deepseek_jax.dtypes import count_nonfinite, torch_dtype_name
from deepseek_jax.metrics import progress_bar
from deepseek_jax.params import to_unrolled
from deepseek_jax.tokenizer import tokenizer_files


class _Source:
  """Our parameters one at a time (partial Orbax reads of one of our checkpoints), or from a
  (config, {path: array}) pair already in memory (a model: `params.flat_state`)."""

  def __init__(self, source, allow_nonfinite: bool = False):
    self.allow_nonfinite = allow_nonfinite
    self._flat = None
    if isinstance(source, tuple):
      cfg, flat = source
      self.directory = "<model>"
      self.cfg = cfg.replace(scan_layers=False)
      self._flat = {k: np.asarray(v) for k, v in to_unrolled(cfg, flat).items()}
      self.meta = dict(self._flat)
    elif checkpoint.is_model_checkpoint(source):
      self.directory = source
      self.cfg = checkpoint.read_config(source)
      self.meta = checkpoint.param_metadata(source)
    else:
      raise FileNotFoundError(f"{source}: not one of our Orbax checkpoints (config.json + "
                              "params/); a trainer workdir is exported through from_pretrained "
                              "(the orbax_to_hf CLI does that)")
    self._cache: dict[str, np.ndarray] = {}

  def dtype(self, path: str) -> np.dtype:
    if path not in self.meta:
      raise KeyError(f"{self.directory}: parameter {path!r} is missing")
    return np.dtype(self.meta[path].dtype)

  def get(self, path: str) -> np.ndarray:
    """One parameter, checked finite unless allowed; the last two read stay cached (a weight and
    its FP8 scales)."""
    if path not in self._cache:
      if len(self._cache) >= 2:
        del self._cache[next(iter(self._cache))]  # release before reading the next
      if self._flat is not None:
        value = self._flat[path]
      else:
        value = checkpoint.read_params_numpy(self.directory, [path])[path]
      bad = 0 if self.allow_nonfinite else count_nonfinite(value)
      if bad:
        raise ValueError(f"{self.directory}: parameter {path!r} holds non-finite values ({bad} "
                         f"NaN or Inf among {value.size}); refusing to export it "
                         "(allow_nonfinite=True / --allow_nonfinite to export it anyway)")
      self._cache[path] = value
    return self._cache[path]


def export(source: str | os.PathLike | tuple[DeepseekConfig, dict], output_dir: str | os.PathLike,
           *, max_shard_size: str | int = "5GB", fp8: bool = False,
           block: tuple[int, int] = fp8_lib.DEFAULT_BLOCK, overwrite: bool = False,
           show_progress: bool = False, copy_from: str | os.PathLike | None = None,
           allow_nonfinite: bool = False) -> list[str]:
  """Writes the released layout of `source` (one of our checkpoints, or a (config, flat
  parameters) pair) to `output_dir` (atomically); returns the shards. The tokenizer's files
  (`tokenizer.TOKENIZER_FILES`) of `copy_from` (default: the checkpoint directory) are copied
  beside them. An `output_dir` that is, contains or lies inside the checkpoint or `copy_from` is
  refused, and so are parameters holding NaN or Inf, named, unless `allow_nonfinite`."""
  if not isinstance(source, tuple):
    source = os.path.abspath(os.fspath(source))
    copy_from = source if copy_from is None else copy_from
  check_apart(output_dir, {"checkpoint_dir": source if isinstance(source, str) else None,
                           "copy_from": copy_from})
  src = _Source(source, allow_nonfinite)
  cfg = src.cfg
  entries = names.entries(cfg)
  for e in entries:
    src.dtype(e.ours)  # every parameter is there before anything is written
    shape = tuple(src.meta[e.ours].shape)
    if shape != e.shape:
      raise ValueError(f"{src.directory}: parameter {e.ours!r} has shape {shape}, the config "
                       f"needs {e.shape}")
  copies = names.mtp_copies(cfg) if cfg.num_nextn_predict_layers else []
  kept = {e.ours for e in entries if e.ours + fp8_lib.SCALE_SUFFIX in src.meta}

  specs: list[TensorSpec] = []
  origin: dict[str, tuple[names.Entry, int, str]] = {}  # hf name -> (entry, expert, kind)
  for e in entries + copies:
    dt = src.dtype(e.ours)
    for i, name in enumerate(e.hf):
      shape = e.hf_shape()
      if e.ours in kept or (fp8 and fp8_lib.is_quantized_name(name) and len(shape) == 2):
        specs.append(TensorSpec(name, fp8_lib.FP8, shape))
        specs.append(TensorSpec(fp8_lib.scale_name(name), np.dtype(np.float32),
                                fp8_lib.scale_shape(shape, block)))
        origin[name] = (e, i, "fp8")
        origin[fp8_lib.scale_name(name)] = (e, i, "scale")
      else:
        specs.append(TensorSpec(name, dt, shape))
        origin[name] = (e, i, "plain")

  quantized: dict[str, tuple[np.ndarray, np.ndarray]] = {}

  def hf_tensor(e: names.Entry, i: int) -> np.ndarray:
    value = src.get(e.ours)
    return value[i] if e.transform == names.EXPERTS else value

  def produce(spec: TensorSpec) -> np.ndarray:
    e, i, kind = origin[spec.name]
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
  hf_config["torch_dtype"] = torch_dtype_name(src.dtype("embed_tokens.embedding"))
  if fp8 or kept:
    hf_config["quantization_config"] = fp8_lib.quantization_config(block)
  extra: dict[str, str | bytes] = {"config.json": json.dumps(hf_config, indent=2)}
  for name, path in (tokenizer_files(copy_from) if copy_from is not None else {}).items():
    with open(path, "rb") as f:
      extra[name] = f.read()
  with progress_bar(sum(s.nbytes for s in specs), enabled=show_progress, unit="B",
                    unit_scale=True, unit_divisor=1000, desc="orbax_to_hf") as bar:
    return write_sharded(output_dir, specs, produce, max_shard_size=max_shard_size,
                         overwrite=overwrite, extra_files=extra,
                         on_tensor=lambda s: bar.update(s.nbytes))


def _to_hf(e: names.Entry, value: np.ndarray) -> np.ndarray:
  """One released tensor from our array (for experts: one expert's slice, already indexed)."""
  return value if e.transform == names.COPY else value.T
