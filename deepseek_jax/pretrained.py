"""`from_pretrained`: the one function that returns a model from disk.

Layouts, each read by a flat reader that returns {dotted path: array} and never builds a model:
a released-layout safetensors directory (`convert.load`; FP8 block scales dequantized, or kept
for an FP8 base), one of our Orbax model checkpoints (`checkpoint.read_params`), a trainer workdir
(`workdir.read_params`, its latest step; a LoRA run's adapters are merged into its base), and an
adapter checkpoint (`adapters.save_adapters`, merged into the base it names). The abstract model
decides every variable's shape and dtype, the sharding rules its placement on `mesh`; the readers
fill exactly that.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax import adapters, checkpoint, quant, workdir
from deepseek_jax.config import DeepseekConfig
from deepseek_jax.convert import fp8
from deepseek_jax.convert.load import HFCheckpoint, iter_hf
from deepseek_jax.layers import LoRAParam
from deepseek_jax.model import DeepseekForCausalLM
from deepseek_jax.params import (abstract_model, flatten, flat_state, model_from_flat, to_scanned,
                                 to_unrolled, variable_specs)
from deepseek_jax.sharding.shard import model_shardings

SAFETENSORS, ORBAX, WORKDIR, ADAPTERS = "safetensors", "orbax", "workdir", "adapters"
LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_targets")


def checkpoint_layout(path: str | os.PathLike) -> str:
  """"safetensors", "orbax" (ours), "workdir" (a trainer's) or "adapters"; FileNotFoundError
  naming `path` and what was expected otherwise."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: not a directory")
  if adapters.is_adapter_checkpoint(path):
    return ADAPTERS
  if checkpoint.is_model_checkpoint(path):
    return ORBAX
  if workdir.is_workdir(path):
    return WORKDIR
  if os.path.isfile(os.path.join(path, "config.json")):
    return SAFETENSORS
  raise FileNotFoundError(
      f"{path}: not a model directory (expected config.json with safetensors, one of our Orbax "
      "checkpoints (config.json + params/), or a trainer workdir (checkpoints/<step>/state))")


def read_model_config(path: str | os.PathLike) -> DeepseekConfig:
  """The config stored with a checkpoint of any of the layouts (a workdir's in its saved layer
  layout; an adapter checkpoint's base)."""
  layout = checkpoint_layout(path)
  if layout == WORKDIR:
    return workdir.read_config(path)
  if layout == ADAPTERS:
    return DeepseekConfig.from_hf(adapters.read_adapter_config(path)["base_model_config"])
  return DeepseekConfig.from_hf(path)


def _targets(cfg: DeepseekConfig, param_dtype, mesh, rules, scanned: bool):
  """{path: ShapeDtypeStruct} of every variable in one layout, sharded on `mesh` by the rules
  (or on the first device)."""
  if mesh is None:
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    specs = variable_specs(cfg, param_dtype=param_dtype, scanned=scanned)
    return {p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one) for p, s in specs.items()}
  shardings = model_shardings(cfg, mesh, rules, scanned=scanned)
  return variable_specs(cfg, param_dtype=param_dtype, scanned=scanned, shardings=shardings)


def _relayout(cfg: DeepseekConfig, flat, scanned_from: bool, targets):
  """Stacks (or unstacks) layers into the layout of `cfg`, placed as `targets` say."""
  if scanned_from == cfg.scan_layers:
    return flat
  move = to_scanned if cfg.scan_layers else to_unrolled
  shardings = {p: t.sharding for p, t in targets.items() if p in move(cfg, flat)}
  return jax.jit(lambda f: move(cfg, f), out_shardings=shardings)(flat)


def _quantized(items: Iterable[tuple[str, Any]], specs, mode: str) -> Iterator[tuple[str, Any]]:
  """(path, value) pairs quantized one weight at a time as the quantized model's `specs` say (a
  kept FP8 weight waits for the `_scale_inv` that follows it); host memory holds one float
  weight, never the float model."""
  waiting = None
  for path, v in items:
    if path.endswith(fp8.SCALE_SUFFIX):
      w_path = path[:-len(fp8.SCALE_SUFFIX)]
      yield from quant.quantize_flat({w_path: waiting, path: v}, specs, mode).items()
      waiting = None
    elif jnp.dtype(v.dtype) == jnp.dtype(fp8.FP8):
      waiting = v
    else:
      yield from quant.quantize_flat({path: v}, specs, mode).items()


def _read(path: str, layout: str, cfg: DeepseekConfig, param_dtype, mesh, rules,
          allow_nonfinite: bool) -> tuple[DeepseekConfig, dict[str, Any]]:
  """(config, values) of a model checkpoint in the layout it was stored in, quantized as
  `cfg.weight_quant` says (released weights checked finite unless `allow_nonfinite`)."""
  mode = cfg.weight_quant
  float_cfg = cfg.replace(weight_quant="none")
  scanned_from = cfg.scan_layers if layout == WORKDIR else False
  targets = _targets(float_cfg, param_dtype, mesh, rules, scanned_from)
  qspecs = variable_specs(cfg, param_dtype=param_dtype, scanned=scanned_from)
  if layout == SAFETENSORS:
    with HFCheckpoint(path, float_cfg, allow_nonfinite=allow_nonfinite) as ckpt:
      float_cfg = ckpt.cfg  # without MTP layers when the checkpoint holds none
      targets = _targets(float_cfg, param_dtype, mesh, rules, False)
      items = iter_hf(ckpt, targets, keep_fp8=mode == "fp8")
      flat = dict(_quantized(items, qspecs, mode) if mode != "none" else items)
    return cfg.replace(num_nextn_predict_layers=float_cfg.num_nextn_predict_layers), flat
  if layout == ORBAX:
    flat = checkpoint.read_params(path, targets)
    if any(p.endswith(fp8.SCALE_SUFFIX) for p in flat):
      flat = {p: v.astype(targets[p].dtype) for p, v in fp8.dequantize_kept(flat).items()}
  else:
    flat = workdir.read_params(path, targets)
  return cfg, quant.quantize_flat(flat, qspecs, mode) if mode != "none" else flat


def _place(cfg: DeepseekConfig, flat, mesh, rules):
  """Every value on the mesh where the rules put it (quantization scales and relayouts follow
  their own shardings otherwise)."""
  if mesh is None:
    return flat
  table = model_shardings(cfg, mesh, rules, scanned=cfg.scan_layers)
  return {p: jax.device_put(v, table[p]) for p, v in flat.items()}


def _lora_workdir(path: str, meta: dict, *, dtype, param_dtype, mesh, rules, allow_nonfinite,
                  overrides) -> DeepseekForCausalLM:
  """A LoRA run's workdir: its base (`init_from`, stored as the run stored it) with the run's
  adapters and router biases, merged."""
  base = from_pretrained(meta["init_from"], dtype=dtype, param_dtype=param_dtype, mesh=mesh,
                         rules=rules, allow_nonfinite=allow_nonfinite,
                         weight_quant=meta.get("weight_quant", "none"), **overrides)
  fields = adapters.lora_fields(**{k[len("lora_"):]: v for k, v in meta["lora"].items()})
  cfg = base.cfg.replace(**fields)
  saved_cfg = cfg.replace(scan_layers=bool(meta.get("scan_layers")))
  trained = list(flatten(nnx.to_pure_dict(nnx.state(abstract_model(saved_cfg),
                                                    nnx.Any(LoRAParam, nnx.Not(nnx.Param))))))
  targets = _targets(saved_cfg, param_dtype, mesh, rules, saved_cfg.scan_layers)
  saved = workdir.read_params(path, {p: targets[p] for p in trained})
  saved = _relayout(cfg, saved, saved_cfg.scan_layers,
                    _targets(cfg, param_dtype, mesh, rules, cfg.scan_layers))
  model = model_from_flat(cfg, {**flat_state(base), **saved}, dtype=dtype,
                          param_dtype=param_dtype)
  return adapters.merge_adapters(model)


def from_pretrained(path: str | os.PathLike, *, dtype=jnp.bfloat16, param_dtype=None, mesh=None,
                    rules=None, allow_nonfinite: bool = False,
                    **config_overrides) -> DeepseekForCausalLM:
  """The model stored in `path`.

  `path` is a released-layout directory (`config.json` plus `model.safetensors` or shards with
  `model.safetensors.index.json`; FP8 block-scaled weights are dequantized), an Orbax checkpoint
  of ours (`python -m deepseek_jax.convert.hf_to_orbax`), a trainer workdir (its latest step; a
  step's directory `<workdir>/checkpoints/<step>` reads that step; a LoRA fine-tune comes back
  with its adapters merged), or an adapter checkpoint (`adapters.save_adapters`; merged into the
  base it names).

  `dtype` is the compute dtype and, unless `param_dtype` says otherwise, the storage dtype.
  `mesh` (a `jax.sharding.Mesh` with axes data/fsdp/expert/tensor, see `sharding.make_mesh`)
  places every variable by `rules` (default `sharding.DEFAULT_RULES`) as it is read: each device
  reads only its own shard, so no host ever holds the whole model. Where the checkpoint's layer
  layout differs from the requested one (`scan_layers`), layers are stacked or unstacked on the
  mesh after reading (transiently twice the layer weights).
  Released weights or FP8 scales holding NaN or Inf are refused (ValueError naming the tensor)
  unless `allow_nonfinite`.
  `config_overrides` replace config fields (e.g. `moe_dispatch="dense"`, `scan_layers=True`);
  `weight_quant="int8"|"fp8"` stores the frozen weights quantized (an FP8 release's weights kept
  as released), quantized one tensor at a time as they are read; `lora_rank=r` (with
  `lora_alpha`, `lora_targets`) adds fresh LoRA adapters (the model's outputs are unchanged).
  """
  path = os.fspath(path)
  layout = checkpoint_layout(path)
  param_dtype = param_dtype or dtype
  lora = {k: config_overrides.pop(k) for k in LORA_FIELDS if k in config_overrides}
  kw = dict(dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules,
            allow_nonfinite=allow_nonfinite)
  if layout == ADAPTERS:
    meta = adapters.read_adapter_config(path)
    if not meta.get("base_model_path"):
      raise ValueError(f"{path}: the adapter checkpoint does not name its base model; load the "
                       "base with from_pretrained and apply it with adapters.load_adapters")
    base = from_pretrained(meta["base_model_path"], **kw, **config_overrides)
    model = adapters.merge_adapters(adapters.load_adapters(base, path, mesh=mesh, rules=rules))
  elif layout == WORKDIR and (meta := workdir.read_meta(path)).get("lora"):
    model = _lora_workdir(path, meta, **kw, overrides=config_overrides)
  else:
    stored = read_model_config(path)
    requested = stored.replace(**config_overrides) if config_overrides else stored
    read_cfg = requested.replace(scan_layers=stored.scan_layers if layout == WORKDIR else False)
    read_cfg, flat = _read(path, layout, read_cfg, param_dtype, mesh, rules, allow_nonfinite)
    cfg = requested.replace(num_nextn_predict_layers=read_cfg.num_nextn_predict_layers)
    flat = _relayout(cfg, flat, read_cfg.scan_layers,
                     _targets(cfg, param_dtype, mesh, rules, cfg.scan_layers))
    model = model_from_flat(cfg, _place(cfg, flat, mesh, rules), dtype=dtype,
                            param_dtype=param_dtype)
  if lora.get("lora_rank"):
    model = adapters.with_adapters(model, rank=lora["lora_rank"],
                                   alpha=lora.get("lora_alpha", 16.0),
                                   targets=lora.get("lora_targets", adapters.LORA_TARGETS),
                                   mesh=mesh, rules=rules)
  return model
