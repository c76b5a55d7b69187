"""Placing models on a mesh by the rules: existing models, fresh ones, and loaded checkpoints.

Fresh models are created from their abstract shape: `nnx.eval_shape` gives every variable's
shape, the rules give its sharding, and the initialiser is jitted with those out-shardings, so
each device only ever holds its own shards.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.config import DeepseekConfig
from deepseek_jax.model import seeded_model
from deepseek_jax.params import abstract_model, flat_state
from deepseek_jax.sharding.rules import MeshAxes, param_shardings


def _map_with_paths(fn, tree):
  """tree_map over a pure dict, passing each leaf's dotted path."""
  def key(p):
    return str(getattr(p, "key", getattr(p, "idx", p)))
  return jax.tree_util.tree_map_with_path(lambda ps, v: fn(".".join(key(p) for p in ps), v), tree)


def model_shardings(cfg: DeepseekConfig, mesh: jax.sharding.Mesh,
                    rules: Mapping[str, MeshAxes] | None = None, *, scanned: bool = False
                    ) -> dict[str, jax.sharding.NamedSharding]:
  """{dotted path: NamedSharding} of every model variable; the unrolled layout (`layers.{i}.…`,
  the loaders' and checkpoints' exchange format) unless `scanned`."""
  abstract = abstract_model(cfg.replace(scan_layers=scanned))
  return param_shardings(flat_state(abstract), mesh, rules)


def shard_flat(flat: Mapping[str, Any], mesh: jax.sharding.Mesh,
               rules: Mapping[str, MeshAxes] | None = None) -> dict[str, jax.Array]:
  """Each array of a flat {path: array} dict (either layout) put on the mesh by the rules."""
  shardings = param_shardings(flat, mesh, rules)
  return {p: jax.device_put(v, shardings[p]) for p, v in flat.items()}


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh,
                rules: Mapping[str, MeshAxes] | None = None) -> nnx.Module:
  """A copy of `model` whose every variable is placed on `mesh` by the rules."""
  graphdef, state = nnx.split(nnx.clone(model))  # the clone is filled; `model` is left alone
  shardings = param_shardings(flat_state(model), mesh, rules)
  placed = _map_with_paths(lambda p, v: jax.device_put(v, shardings[p]), nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, placed)
  return nnx.merge(graphdef, state)


def create_sharded(cfg: DeepseekConfig, mesh: jax.sharding.Mesh,
                   rules: Mapping[str, MeshAxes] | None = None, *, rngs_seed: int = 0,
                   dtype=jnp.float32, param_dtype=None) -> nnx.Module:
  """A freshly initialised model created directly in its shards (equal to the unsharded
  `DeepseekForCausalLM(cfg, rngs=nnx.Rngs(rngs_seed))`)."""
  param_dtype = param_dtype or dtype
  abstract = abstract_model(cfg, dtype=dtype, param_dtype=param_dtype)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = param_shardings(flat_state(abstract), mesh, rules)
  out_shardings = _map_with_paths(lambda p, _: shardings[p], nnx.to_pure_dict(abstract_state))

  def init():
    model = seeded_model(cfg, dtype=dtype, param_dtype=param_dtype, seed=rngs_seed)
    return nnx.to_pure_dict(nnx.state(model))

  with jax.set_mesh(mesh):
    values = jax.jit(init, out_shardings=out_shardings)()
  nnx.replace_by_pure_dict(abstract_state, values)
  return nnx.merge(graphdef, abstract_state)
