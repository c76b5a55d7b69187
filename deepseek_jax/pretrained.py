"""`from_pretrained`: the one function that returns a model from disk.

Three layouts are read, each by a flat reader that returns {dotted path: array} and never builds
a model: a released-layout safetensors directory (`convert.load.load_hf`; FP8 block scales
dequantized), one of our Orbax model checkpoints (`checkpoint.read_params`), and a trainer workdir
(`workdir.read_params`, its latest step). The abstract model decides every variable's shape and
dtype, the sharding rules its placement on `mesh`; the readers fill exactly that.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from deepseek_jax import checkpoint, workdir
from deepseek_jax.config import DeepseekConfig
from deepseek_jax.convert import fp8
from deepseek_jax.convert.load import load_hf
from deepseek_jax.model import DeepseekForCausalLM
from deepseek_jax.params import model_from_flat, to_scanned, to_unrolled, variable_specs
from deepseek_jax.sharding.shard import model_shardings

SAFETENSORS, ORBAX, WORKDIR = "safetensors", "orbax", "workdir"


def checkpoint_layout(path: str | os.PathLike) -> str:
  """"safetensors", "orbax" (ours) or "workdir" (a trainer's); FileNotFoundError naming `path`
  and what was expected otherwise."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: not a directory")
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
  """The config stored with a checkpoint of any of the three layouts."""
  layout = checkpoint_layout(path)
  if layout == WORKDIR:
    return workdir.read_config(path)
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
  """Stacks (or unstacks) layers into the model's layout, placed as `targets` say."""
  if scanned_from == cfg.scan_layers:
    return flat
  move = to_scanned if cfg.scan_layers else to_unrolled
  shardings = {p: t.sharding for p, t in targets.items()}
  return jax.jit(lambda f: move(cfg, f), out_shardings=shardings)(flat)


def from_pretrained(path: str | os.PathLike, *, dtype=jnp.bfloat16, param_dtype=None, mesh=None,
                    rules=None, allow_nonfinite: bool = False,
                    **config_overrides) -> DeepseekForCausalLM:
  """The model stored in `path`.

  `path` is a released-layout directory (`config.json` plus `model.safetensors` or shards with
  `model.safetensors.index.json`; FP8 block-scaled weights are dequantized), an Orbax checkpoint
  of ours (`python -m deepseek_jax.convert.hf_to_orbax`), or a trainer workdir (its latest step;
  a step's directory `<workdir>/checkpoints/<step>` reads that step).

  `dtype` is the compute dtype and, unless `param_dtype` says otherwise, the storage dtype.
  `mesh` (a `jax.sharding.Mesh` with axes data/fsdp/expert/tensor, see `sharding.make_mesh`)
  places every variable by `rules` (default `sharding.DEFAULT_RULES`) as it is read: each device
  reads only its own shard, so no host ever holds the whole model. Where the checkpoint's layer
  layout differs from the requested one (`scan_layers`), layers are stacked or unstacked on the
  mesh after reading (transiently twice the layer weights).
  Released weights or FP8 scales holding NaN or Inf are refused (ValueError naming the tensor)
  unless `allow_nonfinite`.
  `config_overrides` replace config fields (e.g. `moe_dispatch="dense"`, `scan_layers=True`).
  """
  path = os.fspath(path)
  layout = checkpoint_layout(path)
  param_dtype = param_dtype or dtype
  stored = read_model_config(path)
  cfg = stored.replace(**config_overrides) if config_overrides else stored
  scanned_from = stored.scan_layers if layout == WORKDIR else False
  read_targets = _targets(cfg, param_dtype, mesh, rules, scanned_from)
  if layout == SAFETENSORS:
    loaded, flat = load_hf(path, cfg, targets=lambda c: _targets(c, param_dtype, mesh, rules,
                                                                 False),
                           allow_nonfinite=allow_nonfinite)
    # the loader drops MTP layers the checkpoint does not hold
    cfg = cfg.replace(num_nextn_predict_layers=loaded.num_nextn_predict_layers)
  elif layout == ORBAX:
    flat = checkpoint.read_params(path, read_targets)
    if any(p.endswith(fp8.SCALE_SUFFIX) for p in flat):
      flat = {p: v.astype(read_targets[p].dtype) for p, v in fp8.dequantize_kept(flat).items()}
  else:
    flat = workdir.read_params(path, read_targets)
  model_targets = _targets(cfg, param_dtype, mesh, rules, cfg.scan_layers)
  flat = _relayout(cfg, flat, scanned_from, model_targets)
  return model_from_flat(cfg, flat, dtype=dtype, param_dtype=param_dtype)
