"""Parameters as flat {dotted path: array} dicts, and the abstract model that decides them.

The abstract model (`abstract_model`, shapes only) is the one variable policy: every variable's
shape and dtype (the router bias float32 because its module creates it so, everything else
`param_dtype`), and with `variable_specs(..., mesh)` its sharding under the rules. Readers fill
what it describes; `model_from_flat` builds the model around filled values.

The unrolled layout (`layers.{i}.…`) is the exchange format of conversion and checkpoints;
`to_scanned` / `to_unrolled` move between it and the stacked layout of `scan_layers`
(`dense_layers.…` and `moe_layers.…` with a leading layer axis).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax.config import DeepseekConfig
from deepseek_jax.model import DeepseekForCausalLM, seeded_model

STACKS = ("dense_layers", "moe_layers")


# ------------------------------------------------------------------------------ trees
def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  """Nested dict -> {dotted path: leaf}; a flat dict passes through."""
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flatten(v, key + "."))
    else:
      out[key] = v
  return out


def unflatten(flat: Mapping[str, Any], *, int_keys: bool = False) -> dict:
  """{dotted path: leaf} -> nested dict (string keys, as Orbax wants; `int_keys` turns numeric
  parts into ints, as NNX's pure dicts have them). Raises on a path that runs through a leaf."""
  tree: dict = {}
  for path, v in flat.items():
    node = tree
    parts = [int(p) if int_keys and p.isdigit() else p for p in path.split(".")]
    for p in parts[:-1]:
      node = node.setdefault(p, {})
      if not isinstance(node, dict):
        raise ValueError(f"parameter path {path!r} runs through a leaf")
    if parts[-1] in node:
      raise ValueError(f"parameter path {path!r} given twice or is a prefix of another")
    node[parts[-1]] = v
  return tree


def flat_state(model: nnx.Module) -> dict[str, Any]:
  """Every variable of the model (parameters and router biases) by dotted path."""
  return flatten(nnx.to_pure_dict(nnx.state(model)))


# ------------------------------------------------------------------------------ the abstract model
def abstract_model(cfg: DeepseekConfig, *, dtype=jnp.float32, param_dtype=None):
  """The model's structure with shapes and dtypes only (nothing allocated)."""
  param_dtype = param_dtype or dtype
  return nnx.eval_shape(lambda: seeded_model(cfg, dtype=dtype, param_dtype=param_dtype))


def variable_specs(cfg: DeepseekConfig, *, param_dtype=jnp.float32, scanned: bool | None = None,
                   shardings: Mapping[str, jax.sharding.Sharding] | None = None
                   ) -> dict[str, jax.ShapeDtypeStruct]:
  """{path: ShapeDtypeStruct} of every variable, in the stacked layout when `scanned` (default:
  cfg.scan_layers), each with its entry of `shardings` when given (see `sharding.model_shardings`)."""
  scanned = cfg.scan_layers if scanned is None else scanned
  shardings = shardings or {}
  param_dtype = np.dtype(param_dtype)
  return {p: jax.ShapeDtypeStruct(shape, param_dtype if dtype == _FOLLOWS else dtype,
                                  sharding=shardings.get(p))
          for p, shape, dtype in _shapes(cfg.replace(scan_layers=scanned))}


# The dtype `_shapes` traces with, so that one trace serves every `param_dtype`: a variable found
# in it follows `param_dtype`; no variable is ever created in it otherwise (those that keep their
# own dtype are float32 router biases and quantization scales, int8 or FP8 storage).
_FOLLOWS = np.dtype(np.float16)


@functools.lru_cache(maxsize=16)
def _shapes(cfg: DeepseekConfig) -> tuple[tuple[str, tuple, np.dtype], ...]:
  """(path, shape, dtype) of every variable, traced with param_dtype `_FOLLOWS` (cached: tracing
  takes 1.0-1.5 s for the full V3 here, see `model.CONCRETE_KEYS`)."""
  state = flat_state(abstract_model(cfg, param_dtype=_FOLLOWS))
  return tuple((p, tuple(v.shape), np.dtype(v.dtype)) for p, v in state.items())


def model_from_flat(cfg: DeepseekConfig, flat: Mapping[str, Any], *, dtype=jnp.float32,
                    param_dtype=None) -> DeepseekForCausalLM:
  """Builds the model around given values (unrolled layout; stacked here if cfg.scan_layers),
  each cast to the dtype the abstract model gives it. Every variable must be present with its
  exact shape; nothing is initialised randomly."""
  param_dtype = param_dtype or dtype
  if cfg.scan_layers and not any(p.startswith(STACKS) for p in flat):
    flat = to_scanned(cfg, flat)
  graphdef, state = nnx.split(abstract_model(cfg, dtype=dtype, param_dtype=param_dtype))
  want = flatten(nnx.to_pure_dict(state))
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
    values[path] = v if isinstance(v, jax.Array) and v.dtype == spec.dtype else jnp.asarray(
        v, spec.dtype)
  nnx.replace_by_pure_dict(state, unflatten(values, int_keys=True))
  return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------------ layouts
def _stack_of(cfg: DeepseekConfig, i: int) -> tuple[str, int]:
  n_dense = cfg.num_dense_layers
  return ("dense_layers", i) if i < n_dense else ("moe_layers", i - n_dense)


def to_scanned(cfg: DeepseekConfig, flat: Mapping[str, Any]) -> dict[str, Any]:
  """`layers.{i}.rest` -> `dense_layers.rest` / `moe_layers.rest` stacked along axis 0."""
  groups: dict[str, dict[int, Any]] = {}
  out = {}
  for path, v in flat.items():
    if path.startswith("layers."):
      _, i, rest = path.split(".", 2)
      stack, j = _stack_of(cfg, int(i))
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
    if stack in STACKS:
      offset = 0 if stack == "dense_layers" else n_dense
      for j in range(v.shape[0]):
        out[f"layers.{j + offset}.{rest}"] = v[j]
    else:
      out[path] = v
  return out
