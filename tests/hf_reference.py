"""Tiny transformers reference models (the oracle) built from our configs, saved with save_pretrained."""

from __future__ import annotations

import os

import numpy as np

from deepseek_jax.config import DeepseekConfig


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
  """Writes the reference model as released-layout safetensors; returns the torch model."""
  model = hf_model(cfg, seed)
  model.save_pretrained(os.fspath(directory), **kw)
  return model


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
