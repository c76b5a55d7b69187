"""`from_pretrained`: a released-layout safetensors directory (or our Orbax checkpoint) -> model."""

from __future__ import annotations

import json
import logging
import os

import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import DeepseekConfig
from deepseek_jax.params import model_from_flat

log = logging.getLogger(__name__)


def _safetensors_files(path: str) -> dict[str, str]:
  """Tensor name -> file, from `model.safetensors.index.json` or the single `model.safetensors`."""
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index, encoding="utf-8") as f:
      weight_map = json.load(f)["weight_map"]
    return {name: os.path.join(path, fname) for name, fname in weight_map.items()}
  single = os.path.join(path, "model.safetensors")
  if not os.path.isfile(single):
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
  from safetensors import safe_open
  with safe_open(single, framework="numpy") as f:
    return {name: single for name in f.keys()}


def read_hf_params(path: str, cfg: DeepseekConfig) -> tuple[DeepseekConfig, dict[str, np.ndarray]]:
  """Our flat parameters from a released-layout directory (whole tensors, numpy dtypes)."""
  from safetensors import safe_open

  from convert import names
  files = _safetensors_files(path)
  if cfg.num_nextn_predict_layers and not any(names.is_mtp_name(cfg, n) for n in files):
    log.warning("%s: config has num_nextn_predict_layers=%d but the checkpoint holds no MTP "
                "tensors; loading without MTP", path, cfg.num_nextn_predict_layers)
    cfg = cfg.replace(num_nextn_predict_layers=0)
  handles = {}
  flat = {}
  for entry in names.entries(cfg):
    tensors = []
    for name in entry.hf:
      if name not in files:
        raise KeyError(f"{path}: tensor {name!r} (for {entry.ours}) is missing")
      fname = files[name]
      if fname not in handles:
        handles[fname] = safe_open(fname, framework="numpy")
      t = handles[fname].get_tensor(name)
      if tuple(t.shape) != entry.hf_shape():
        raise ValueError(f"{fname}: tensor {name!r} has shape {tuple(t.shape)}, "
                         f"expected {entry.hf_shape()}")
      tensors.append(t)
    flat[entry.ours] = entry.to_ours(tensors)
  return cfg, flat


def from_pretrained(path: str | os.PathLike, *, dtype=jnp.bfloat16, param_dtype=None, mesh=None,
                    **config_overrides):
  """The model stored in `path`: `config.json` plus safetensors (one file or an index of shards).

  `dtype` is the compute dtype and, unless `param_dtype` says otherwise, the storage dtype.
  `config_overrides` replace config fields (e.g. `moe_dispatch="dense"`, `scan_layers=True`).
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: not a directory")
  if mesh is not None:
    raise NotImplementedError("sharded loading arrives with the sharding package")
  cfg = DeepseekConfig.from_hf(path, **config_overrides)
  cfg, flat = read_hf_params(path, cfg)
  return model_from_flat(cfg, flat, dtype=dtype, param_dtype=param_dtype)
