"""The conversion plan of a config: every tensor on both sides, total bytes, host memory needed.

Nothing is read but `config.json`: the plan for DeepSeek-V3 (671B parameters) takes seconds.
Released dtypes follow the config: with `quantization_config` (fp8 blocks) the decoder's projection
weights are F8_E4M3 with F32 `weight_scale_inv`; the router's correction bias is F32; the rest
is the config's `torch_dtype` (BF16 by default).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

import numpy as np

from deepseek_jax.convert import fp8, names
from deepseek_jax import dtypes
from deepseek_jax.dtypes import SAFETENSORS as DTYPES
from deepseek_jax.config import DeepseekConfig, read_config_json

def human_bytes(n: float) -> str:
  """1234567 -> "1.2 MB" (decimal units, as the released checkpoints count them)."""
  for unit in ("B", "KB", "MB", "GB", "TB"):
    if abs(n) < 1000 or unit == "TB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
    n /= 1000
  return f"{n:.1f} TB"




@dataclasses.dataclass(frozen=True)
class Row:
  hf_name: str
  hf_shape: tuple[int, ...]
  hf_dtype: str                 # safetensors dtype name
  ours: str                     # our parameter path ("" for MTP copies and FP8 scales)
  our_shape: tuple[int, ...]
  our_dtype: str


@dataclasses.dataclass(frozen=True)
class Plan:
  cfg: DeepseekConfig
  rows: list[Row]
  params: int                   # our parameters (MTP included when the config has it)
  hf_bytes: int                 # the released files' tensor bytes
  our_bytes: int
  host_to_orbax: int            # host memory hf_to_orbax needs beyond the interpreter
  host_to_hf: int               # host memory orbax_to_hf needs


def _raw_config(config: str | os.PathLike | Mapping[str, Any] | DeepseekConfig
                ) -> tuple[dict, str]:
  """(the config.json dict, where it came from)."""
  if isinstance(config, DeepseekConfig):
    return config.to_hf(), "<DeepseekConfig>"
  if isinstance(config, Mapping):
    return dict(config), "<dict>"
  return read_config_json(config)


def make_plan(config: str | os.PathLike | Mapping[str, Any] | DeepseekConfig, *,
              dtype: str = "bfloat16") -> Plan:
  """The plan for converting a checkpoint of `config` (a path, dict or DeepseekConfig)."""
  our_size = dtypes.from_name(dtype).itemsize
  raw, source = _raw_config(config)
  cfg = config if isinstance(config, DeepseekConfig) else DeepseekConfig.from_hf(raw,
                                                                                  _source=source)
  cfg = cfg.replace(scan_layers=False)
  block = fp8.block_size(raw)
  torch_dtype = str(raw.get("torch_dtype", raw.get("dtype", "bfloat16")))
  default = dtypes.safetensors_name(dtypes.BY_NAME.get(torch_dtype, dtypes.BY_NAME["bfloat16"]))
  rows: list[Row] = []
  params = hf_bytes = our_bytes = 0
  largest_ours = host_stage = host_hf = 0
  # The abstract model decides which variables keep float32 whatever the parameter dtype (the
  # router bias): those are float32 in the release too.
  entries = names.entries(cfg, param_dtype="bfloat16")
  kept32 = {e.ours for e in entries if e.dtype == "float32"}
  for e in entries + (names.mtp_copies(cfg) if cfg.num_nextn_predict_layers else []):
    copy = e.ours in ("embed_tokens.embedding", "lm_head.kernel") and names.is_mtp_name(cfg, e.hf[0])
    bias = e.ours in kept32
    our_dtype = "float32" if bias else dtype
    n = math.prod(e.shape)
    our_item = np.dtype(our_dtype).itemsize
    if not copy:
      params += n
      our_bytes += n * our_item
      largest_ours = max(largest_ours, n * our_item)
    staged_size = 0
    for name in e.hf:
      shape = e.hf_shape()
      quant = block is not None and fp8.is_quantized_name(name) and len(shape) == 2
      hf_dtype = "F32" if bias else ("F8_E4M3" if quant else default)
      rows.append(Row(name, shape, hf_dtype, "" if copy else e.ours, () if copy else e.shape,
                      "" if copy else our_dtype))
      hf_bytes += math.prod(shape) * DTYPES[hf_dtype].itemsize
      if quant:
        sshape = fp8.scale_shape(shape, block)
        rows.append(Row(fp8.scale_name(name), sshape, "F32", "", (), ""))
        hf_bytes += math.prod(sshape) * 4
      # orbax_to_hf: one released tensor (FP8: float32 copy, padded blocks and the quotient).
      host_hf = max(host_hf, math.prod(shape) * (DTYPES[hf_dtype].itemsize + (12 if quant else 0)))
      staged_size = DTYPES[hf_dtype].itemsize if not quant else 4
    if not copy:
      # hf_to_orbax: the staged released-layout copy (experts and FP8 cast piece by piece to the
      # target) plus the converted parameter.
      staged = our_size if (e.transform == names.EXPERTS or staged_size == 4 and block) else staged_size
      host_stage = max(host_stage, n * (staged + our_item))
  host_to_hf = largest_ours + host_hf
  # The group awaiting its Orbax save holds at most the largest parameter.
  return Plan(cfg, rows, params, hf_bytes, our_bytes, largest_ours + host_stage, host_to_hf)


def format_plan(plan: Plan) -> str:
  lines = []
  w = max(len(r.hf_name) for r in plan.rows)
  lines.append(f"{'released tensor':<{w}}  {'shape':<16} {'dtype':<8}  {'ours':<44} "
               f"{'shape':<20} dtype")
  for r in plan.rows:
    lines.append(f"{r.hf_name:<{w}}  {str(list(r.hf_shape)):<16} {r.hf_dtype:<8}  "
                 f"{r.ours or '-':<44} {str(list(r.our_shape)) if r.ours else '-':<20} "
                 f"{r.our_dtype or '-'}")
  cfg = plan.cfg
  main = cfg.num_params()
  lines += [
      "",
      f"released tensors: {len(plan.rows)}   our parameters: {len({r.ours for r in plan.rows if r.ours})}",
      f"parameters: {plan.params:,} ({plan.params / 1e9:.1f}B; {main / 1e9:.1f}B without MTP, "
      f"{cfg.num_params(active=True) / 1e9:.1f}B active per token)",
      f"released bytes: {human_bytes(plan.hf_bytes)}   ours: {human_bytes(plan.our_bytes)}",
      f"host memory: hf_to_orbax {human_bytes(plan.host_to_orbax)}, orbax_to_hf "
      f"{human_bytes(plan.host_to_hf)} (one tensor at a time; independent of the model size)",
  ]
  return "\n".join(lines)
