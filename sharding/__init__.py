"""Sharding over device meshes: data, FSDP, expert and tensor parallelism, multi-host start-up,
and memory plans.

  mesh = sharding.make_mesh(fsdp=2, expert=4)            # axes data, fsdp, expert, tensor
  model = sharding.create_sharded(cfg, mesh)             # created in its shards
  model = sharding.shard_model(model, mesh)              # or an existing model placed by the rules
  sharding.plan(cfg, {"fsdp": 64, "expert": 4}, batch=256, seq_len=4096).fits("v5p")
"""

from sharding import expert_parallel
from sharding.expert_parallel import expert_parallel_moe
from sharding.memory import DEVICE_MEMORY, Plan, device_memory, plan, slice_devices
from sharding.mesh import AXES, device_grid, initialize, make_mesh, parse_mesh
from sharding.rules import (DEFAULT_RULES, PARAM_AXES, activation_spec, batch_spec, logical_axes,
                            param_shardings, parse_rules, shard_activation, spec_for)
from sharding.shard import create_sharded, model_shardings, shard_flat, shard_model

__all__ = ["AXES", "DEFAULT_RULES", "DEVICE_MEMORY", "PARAM_AXES", "Plan", "activation_spec",
           "batch_spec", "device_grid", "device_memory", "expert_parallel", "shard_activation", "slice_devices",
           "create_sharded", "expert_parallel_moe", "initialize", "logical_axes", "make_mesh",
           "model_shardings", "param_shardings", "parse_mesh", "parse_rules", "plan", "shard_flat",
           "shard_model", "spec_for"]

