"""Parameters as flat {dotted path: array} dicts: read from, write into, and build models.

The unrolled layout (`layers.{i}.…`) is the exchange format of conversion and checkpoints;
`to_scanned` / `to_unrolled` move between it and the stacked layout of `scan_layers`
(`dense_layers.…` and `moe_layers.…` with a leading layer axis).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax.config import DeepseekConfig


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def _unflatten(flat: Mapping[str, Any]) -> dict:
  tree: dict = {}
  for path, v in flat.items():
    node = tree
    parts = [int(p) if p.isdigit() else p for p in path.split(".")]
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = v
  return tree


def flat_state(model: nnx.Module) -> dict[str, Any]:
  """Every variable of the model (parameters and router biases) by dotted path."""
  return _flatten(nnx.to_pure_dict(nnx.state(model)))


def abstract_model(cfg: DeepseekConfig, *, dtype=jnp.float32, param_dtype=jnp.float32):
  """The model's structure with shapes only (nothing allocated)."""
  from deepseek_jax.model import DeepseekForCausalLM
  return nnx.eval_shape(lambda: DeepseekForCausalLM(cfg, dtype=dtype, param_dtype=param_dtype,
                                                    rngs=nnx.Rngs(0)))


def model_from_flat(cfg: DeepseekConfig, flat: Mapping[str, Any], *, dtype=jnp.float32,
                    param_dtype=None) -> nnx.Module:
  """Builds the model around given parameters (unrolled layout; stacked here if cfg.scan_layers).

  Every variable must be present with its exact shape; nothing is initialised randomly.
  """
  param_dtype = param_dtype or dtype
  if cfg.scan_layers:
    flat = to_scanned(cfg, flat)
  abstract = abstract_model(cfg, dtype=dtype, param_dtype=param_dtype)
  graphdef, state = nnx.split(abstract)
  want = _flatten(nnx.to_pure_dict(state))
  missing = sorted(set(want) - set(flat))
  extra = sorted(set(flat) - set(want))
  if missing or extra:
    raise ValueError(f"parameters do not match the config: missing {missing[:8]}"
                     f"{'…' if len(missing) > 8 else ''}, unexpected {extra[:8]}"
                     f"{'…' if len(extra) > 8 else ''}")
  values = {}
  for path, spec in want.items():
    v = flat[path]
    if tuple(v.shape) != tuple(spec.shape):
      raise ValueError(f"parameter {path}: shape {tuple(v.shape)}, expected {tuple(spec.shape)}")
    target = spec.dtype if path.endswith("e_score_correction_bias") else param_dtype
    values[path] = v if isinstance(v, jax.Array) and v.dtype == target else jnp.asarray(v, target)
  nnx.replace_by_pure_dict(state, _unflatten(values))
  return nnx.merge(graphdef, state)


def _stack_split(cfg: DeepseekConfig) -> Callable[[int], tuple[str, int]]:
  n_dense = cfg.num_dense_layers

  def where(i: int) -> tuple[str, int]:
    return ("dense_layers", i) if i < n_dense else ("moe_layers", i - n_dense)

  return where


def to_scanned(cfg: DeepseekConfig, flat: Mapping[str, Any]) -> dict[str, Any]:
  """`layers.{i}.rest` -> `dense_layers.rest` / `moe_layers.rest` stacked along axis 0."""
  where = _stack_split(cfg)
  groups: dict[str, dict[int, Any]] = {}
  out = {}
  for path, v in flat.items():
    if path.startswith("layers."):
      _, i, rest = path.split(".", 2)
      stack, j = where(int(i))
      groups.setdefault(f"{stack}.{rest}", {})[j] = v
    else:
      out[path] = v
  for path, by_index in groups.items():
    items = [by_index[j] for j in range(len(by_index))]
    xp = jnp if any(isinstance(a, jax.Array) for a in items) else np
    out[path] = xp.stack(items)
  return out


def to_unrolled(cfg: DeepseekConfig, flat: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of `to_scanned`."""
  n_dense = cfg.num_dense_layers
  out = {}
  for path, v in flat.items():
    stack, _, rest = path.partition(".")
    if stack in ("dense_layers", "moe_layers"):
      offset = 0 if stack == "dense_layers" else n_dense
      for j in range(v.shape[0]):
        out[f"layers.{j + offset}.{rest}"] = v[j]
    else:
      out[path] = v
  return out
