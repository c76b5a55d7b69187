"""Sharding over device meshes: data, FSDP, expert and tensor parallelism, multi-host start-up,
and memory plans.

  mesh = sharding.make_mesh(fsdp=2, expert=4)            # axes data, fsdp, expert, tensor
  model = sharding.create_sharded(cfg, mesh)             # created in its shards
  model = sharding.shard_model(model, mesh)              # or an existing model placed by the rules
  sharding.memory_plan(cfg, {"fsdp": 64, "expert": 4}, batch=256, seq_len=4096).fits("v5p")

Expert parallelism needs no call of its own: the MoE layers exchange token copies over the
"expert" axis whenever the active mesh (`jax.set_mesh`) has one larger than 1
(`expert_parallel_moe`, re-exported here from `deepseek_jax.expert_parallel`).
"""

from deepseek_jax.expert_parallel import expert_parallel_moe
from deepseek_jax.sharding.memory import DEVICE_MEMORY, Plan, device_memory, memory_plan, slice_devices
from deepseek_jax.sharding.mesh import AXES, device_grid, initialize, make_mesh, parse_mesh
from deepseek_jax.sharding.rules import (DEFAULT_RULES, PARAM_AXES, activation_spec, batch_spec,
                                         logical_axes, param_shardings, parse_rules,
                                         shard_activation, spec_for)
from deepseek_jax.sharding.shard import create_sharded, model_shardings, shard_flat, shard_model

__all__ = ["AXES", "DEFAULT_RULES", "DEVICE_MEMORY", "PARAM_AXES", "Plan", "activation_spec",
           "batch_spec", "create_sharded", "device_grid", "device_memory", "expert_parallel_moe",
           "initialize", "logical_axes", "make_mesh", "memory_plan", "model_shardings",
           "param_shardings", "parse_mesh", "parse_rules", "shard_activation", "shard_flat",
           "shard_model", "slice_devices", "spec_for"]
