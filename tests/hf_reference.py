"""Tiny transformers reference models (the oracle) built from our configs, saved with save_pretrained.

Without torch (the current stack: no CPU torch wheel for its Python on these machines) `save_hf`
writes the same released layout with numpy (`_save_released_numpy`) and returns None: tests that
only need a checkpoint on disk run on both stacks; tests that compare against the returned
transformers model are marked `torch` (tests/conftest.py) and run where torch is installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re

import numpy as np

from deepseek_jax.config import DeepseekConfig

HAVE_TORCH = importlib.util.find_spec("torch") is not None


def hf_model(cfg: DeepseekConfig, seed: int = 0, bias_std: float = 0.05):
  """A float32 transformers DeepseekV2/V3ForCausalLM with random weights for `cfg`.

  Weights are drawn larger than the release's init (std 0.02) so routing and attention are far
  from uniform; the noaux_tc correction bias is random and nonzero.
  """
  import torch
  import transformers
  torch.manual_seed(seed)
  d = cfg.to_hf()
  if cfg.model_type == "deepseek_v3":
    hf_cfg = transformers.DeepseekV3Config(**d)
    cls = transformers.DeepseekV3ForCausalLM
  else:
    hf_cfg = transformers.DeepseekV2Config(**d)
    cls = transformers.DeepseekV2ForCausalLM
  model = cls(hf_cfg).float().eval()
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(0.08 * torch.randn(p.shape, generator=g))
    for name, b in model.named_buffers():
      if name.endswith("e_score_correction_bias"):
        b.copy_(bias_std * torch.randn(b.shape, generator=g))
  return model


def save_hf(cfg: DeepseekConfig, directory: str | os.PathLike, seed: int = 0, **kw):
  """Writes the reference model as released-layout safetensors; returns the torch model.

  Without torch: the same layout (names, [out, in] shapes, no MTP tensors, shards and index as
  save_pretrained writes them) from numpy with the same weight scales; returns None.
  """
  if not HAVE_TORCH:
    _save_released_numpy(cfg, directory, seed, **kw)
    return None
  model = hf_model(cfg, seed)
  model.save_pretrained(os.fspath(directory), **kw)
  return model


def save_fp8_release(plain: str | os.PathLike, directory: str | os.PathLike,
                     max_shard_size: str = "100KB") -> None:
  """Writes the released checkpoint in `plain` again in V3's released FP8 layout (block-scaled
  weights with their `_scale_inv` tensors, `quantization_config` in config.json) into
  `directory`, in shards of `max_shard_size`."""
  from deepseek_jax.convert import fp8
  from deepseek_jax.convert.safetensors_read import SafetensorsDir
  from deepseek_jax.convert.safetensors_write import TensorSpec, write_sharded
  raw = json.loads(open(os.path.join(plain, "config.json")).read())
  q = {}
  with SafetensorsDir(plain) as src:
    for k in src.keys():
      w = src.read(k)
      if fp8.is_quantized_name(k):
        q[k], q[fp8.scale_name(k)] = fp8.quantize(w)
      else:
        q[k] = w
  specs = [TensorSpec(k, v.dtype, v.shape) for k, v in q.items()]
  write_sharded(directory, specs, lambda s: q[s.name], max_shard_size=max_shard_size,
                extra_files={"config.json": json.dumps(
                    {**raw, "quantization_config": fp8.quantization_config()})})


def _size(s: str | int) -> int:
  if isinstance(s, int):
    return s
  m = re.fullmatch(r"\s*(\d+)\s*([KMG]i?B)?\s*", s, re.I)
  unit = (m.group(2) or "B").upper()
  return int(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
                            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]


def _save_released_numpy(cfg: DeepseekConfig, directory, seed: int = 0,
                         max_shard_size: str | int = "50GB") -> None:
  """transformers' save_pretrained layout without torch: float32 tensors named and shaped as
  released (norms 1 + 0.1 N(0,1), other weights 0.08 N(0,1), correction bias 0.05 N(0,1)),
  written by the safetensors library in sorted-name shards, plus config.json."""
  from safetensors.numpy import save_file

  from deepseek_jax.convert import names

  rng = np.random.default_rng(seed + 1)
  tensors = {}
  for e in names.entries(cfg):
    for name in e.hf:
      if names.is_mtp_name(cfg, name):
        continue  # transformers creates no MTP weights
      shape = e.hf_shape()
      if name.endswith("e_score_correction_bias"):
        t = 0.05 * rng.standard_normal(shape)
      elif "norm" in name:
        t = 1.0 + 0.1 * rng.standard_normal(shape)
      else:
        t = 0.08 * rng.standard_normal(shape)
      tensors[name] = t.astype(np.float32)
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  limit, shards = _size(max_shard_size), [[]]
  used = 0
  for name in sorted(tensors):
    n = tensors[name].nbytes
    if shards[-1] and used + n > limit:
      shards.append([])
      used = 0
    shards[-1].append(name)
    used += n
  meta = {"format": "pt"}
  if len(shards) == 1:
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata=meta)
  else:
    weight_map = {}
    for i, group in enumerate(shards):
      fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      save_file({k: tensors[k] for k in group}, os.path.join(directory, fname), metadata=meta)
      weight_map.update({k: fname for k in group})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
             "weight_map": weight_map}
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
      json.dump(index, f, indent=2)
  cfg.save(directory)


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
  """float32 logits [B, T, V] of the reference (whatever its dtype)."""
  import torch
  with torch.no_grad():
    return model(torch.from_numpy(np.asarray(ids, np.int64))).logits.float().numpy()


def hf_load(directory: str | os.PathLike, dtype="float32"):
  """transformers' own loading of a saved reference model in `dtype` ("bfloat16" keeps the
  noaux_tc correction bias in float32, as transformers does)."""
  import torch
  import transformers
  return transformers.AutoModelForCausalLM.from_pretrained(
      os.fspath(directory), dtype=getattr(torch, dtype)).eval()
