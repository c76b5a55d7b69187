"""LoRA adapters on a loaded model: add fresh ones, merge them into the weights, and save or load
them alone.

An adapter checkpoint is a directory with `adapter_config.json` (rank, alpha, target patterns,
the base model's config and, when known, its path) and `params/`, an Orbax PyTree of the
adapters alone (`LoRAParam` variables, unrolled layout): a few percent of the base's size.
`from_pretrained` reads it as a model when it names its base.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax import checkpoint
from deepseek_jax.config import LORA_TARGETS, DeepseekConfig
from deepseek_jax.json_file import read_json_object
from deepseek_jax.layers import Embed, Linear, LoRAParam
from deepseek_jax.model import DeepseekForCausalLM, seeded_model
from deepseek_jax.moe import RoutedExperts
from deepseek_jax.params import (abstract_model, flat_state, flatten, model_from_flat, to_scanned,
                                 to_unrolled, variable_specs)
from deepseek_jax.sharding.shard import model_shardings

ADAPTER_CONFIG = "adapter_config.json"


def lora_fields(rank: int, alpha: float = 16.0, targets=LORA_TARGETS) -> dict[str, Any]:
  """The config fields of a LoRA setting (`DeepseekConfig.replace(**lora_fields(...))`)."""
  return {"lora_rank": int(rank), "lora_alpha": float(alpha), "lora_targets": tuple(targets)}


def adapter_paths(cfg: DeepseekConfig) -> list[str]:
  """Paths of the LoRA variables of a model with config `cfg` (its own layer layout)."""
  return list(flatten(nnx.to_pure_dict(nnx.state(abstract_model(cfg), LoRAParam))))


def adapter_state(model: DeepseekForCausalLM) -> dict[str, jax.Array]:
  """The model's adapters by dotted path (its own layer layout)."""
  return flatten(nnx.to_pure_dict(nnx.state(model, LoRAParam)))


def _placed(cfg: DeepseekConfig, paths, mesh, rules):
  if mesh is None:
    return None
  table = model_shardings(cfg, mesh, rules, scanned=cfg.scan_layers)
  return {p: table[p] for p in paths}


def with_adapters(model: DeepseekForCausalLM, *, rank: int, alpha: float = 16.0,
                  targets=LORA_TARGETS, seed: int = 0, mesh=None, rules=None
                  ) -> DeepseekForCausalLM:
  """The model with fresh adapters (A random, B zero: its outputs are unchanged) on the
  projections `targets` names; the base variables are shared, not copied. On a mesh the adapters
  are created in the shards the rules give them (those of the weights they adapt)."""
  cfg = model.cfg.replace(**lora_fields(rank, alpha, targets))
  paths = adapter_paths(cfg)

  def init():
    fresh = seeded_model(cfg, dtype=model.dtype, param_dtype=model.param_dtype, seed=seed)
    return adapter_state(fresh)  # only these are computed: the rest is dead code to XLA

  fresh = jax.jit(init, out_shardings=_placed(cfg, paths, mesh, rules))()
  return model_from_flat(cfg, {**flat_state(model), **fresh}, dtype=model.dtype,
                         param_dtype=model.param_dtype)


def merge_adapters(model: DeepseekForCausalLM) -> DeepseekForCausalLM:
  """The model with every adapter merged into its weight, W <- W + A B · alpha/r (computed in
  float32, stored in the model's parameter dtype); a quantized base is dequantized. The result
  has no adapters and plain float weights, as a released checkpoint does."""
  cfg = model.cfg.replace(lora_rank=0, weight_quant="none")
  dtype = model.param_dtype
  merged: dict[str, jax.Array] = {}
  for path, m in nnx.iter_modules(model):
    prefix = ".".join(map(str, path))
    if isinstance(m, Linear):
      merged[f"{prefix}.kernel"] = m.merged_kernel(jnp.float32).astype(dtype)
    elif isinstance(m, RoutedExperts):
      for name in m.PROJECTIONS:
        merged[f"{prefix}.{name}"] = m.merged(name, jnp.float32).astype(dtype)
    elif isinstance(m, Embed):
      merged[f"{prefix}.embedding"] = m.table(jnp.float32).astype(dtype)
  specs = variable_specs(cfg, param_dtype=dtype)
  rest = {p: v for p, v in flat_state(model).items() if p in specs and p not in merged}
  return model_from_flat(cfg, {**rest, **merged}, dtype=model.dtype, param_dtype=dtype)


def save_adapters(model: DeepseekForCausalLM, directory: str | os.PathLike, *,
                  base_path: str | None = None, overwrite: bool = False) -> str:
  """Writes the model's adapters alone (see the module docstring); returns the directory."""
  cfg = model.cfg
  if not cfg.lora_rank:
    raise ValueError("save_adapters: the model has no LoRA adapters (lora_rank is 0)")
  adapters = adapter_state(model)
  if cfg.scan_layers:
    adapters = to_unrolled(cfg, adapters)
  meta = {"lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha,
          "lora_targets": list(cfg.lora_targets), "base_model_path": base_path,
          "base_model_config": cfg.to_hf()}
  return checkpoint.save_params(directory, None, adapters, overwrite=overwrite,
                                extra_files={ADAPTER_CONFIG: json.dumps(meta, indent=2)})


def is_adapter_checkpoint(path: str | os.PathLike) -> bool:
  return os.path.isfile(os.path.join(os.fspath(path), ADAPTER_CONFIG))


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
  path = os.path.join(os.fspath(directory), ADAPTER_CONFIG)
  meta = read_json_object(path)
  for key in ("lora_rank", "lora_alpha", "lora_targets"):
    if key not in meta:
      raise ValueError(f"{path}: missing {key!r}")
  return meta


def load_adapters(model: DeepseekForCausalLM, directory: str | os.PathLike, *, mesh=None,
                  rules=None) -> DeepseekForCausalLM:
  """The model (a base without adapters) with the adapters saved in `directory`, each read
  straight into its shards on `mesh`."""
  meta = read_adapter_config(directory)
  cfg = model.cfg.replace(**lora_fields(meta["lora_rank"], meta["lora_alpha"],
                                        meta["lora_targets"]))
  unrolled = cfg.replace(scan_layers=False)
  specs = variable_specs(unrolled, shardings=_placed(unrolled, adapter_paths(unrolled), mesh,
                                                     rules))
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  targets = {p: jax.ShapeDtypeStruct(specs[p].shape, specs[p].dtype,
                                     sharding=specs[p].sharding or one)
             for p in adapter_paths(unrolled)}
  adapters = checkpoint.read_params(directory, targets)
  if cfg.scan_layers:
    adapters = to_scanned(cfg, adapters)
  return model_from_flat(cfg, {**flat_state(model), **adapters}, dtype=model.dtype,
                         param_dtype=model.param_dtype)
