"""Sharded model on 8 host CPU devices (in a subprocess) equals the single-device model; on a mesh
with an expert axis the model runs the expert-parallel exchange itself (all-to-all in its
jaxpr), with no patching."""

from __future__ import annotations

import json
import math

import jax
import pytest
from sharding_worker import run as run_worker

from deepseek_jax.sharding import spec_for

# "scan": also the scanned layout
MESHES = [{"data": 8}, {"fsdp": 8}, {"data": 2, "tensor": 4},
          {"fsdp": 2, "expert": 4, "scan": True}, {"data": 2, "expert": 2, "tensor": 2}]
AXES = ("data", "fsdp", "expert", "tensor")


@pytest.fixture(scope="module")
def results():
  return run_worker("models", json.dumps(MESHES))


def _abstract_mesh(sizes):
  return jax.sharding.AbstractMesh(tuple(sizes.get(a, 1) for a in AXES), AXES)


def test_every_mesh_matches_one_device(results):
  runs = [r for r in results if "mesh" in r]
  assert len(runs) == len(MESHES) + 1  # the scanned layout once more
  for r in runs:
    expert_parallel = r["mesh"].get("expert", 1) > 1
    assert r["all_to_all"] == expert_parallel and r["shard_map"] == expert_parallel, r["mesh"]
    assert r["logits_err"] < 1e-5, r["mesh"]
    assert abs(r["loss"] - r["ref_loss"]) < 1e-5, r["mesh"]
    assert r["grad_rel_err"] < 1e-5, r["mesh"]


def test_shard_shapes_follow_the_rules(results):
  for r in (r for r in results if "mesh" in r):
    sizes = r["mesh"]
    mesh = _abstract_mesh(sizes)
    for path, s in r["shards"].items():
      spec = spec_for(path, tuple(s["shape"]), mesh)
      want = []
      for i, dim in enumerate(s["shape"]):
        axes = spec[i] if i < len(spec) else None
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        want.append(dim // math.prod(sizes.get(a, 1) for a in axes))
      assert s["shard"] == want, (sizes, path, s)
      if "experts." in path and "shared_experts" not in path and sizes.get("expert", 1) > 1:
        e_dim = 1 if r["scan"] and path.startswith("moe_layers") else 0
        assert s["shard"][e_dim] == s["shape"][e_dim] // sizes["expert"], (sizes, path)
  # hand-written expectations for one mesh
  r = next(r for r in results if r.get("mesh") == {"data": 2, "expert": 2, "tensor": 2}
           and not r["scan"])
  sh = r["shards"]
  assert sh["layers.1.mlp.experts.gate_proj"]["shard"] == [8, 64, 16]    # [E/2, D, I/2]
  assert sh["layers.1.mlp.experts.down_proj"]["shard"] == [8, 16, 64]    # [E/2, I/2, D]
  assert sh["embed_tokens.embedding"]["shard"] == [256, 64]              # [V/2, D]
  assert sh["layers.0.self_attn.q_b_proj.kernel"]["shard"] == [32, 48]   # heads over tensor
  assert sh["layers.0.self_attn.o_proj.kernel"]["shard"] == [32, 64]
  assert sh["norm.scale"]["shard"] == [64]
  r = next(r for r in results if r.get("mesh") == {"fsdp": 8} and not r["scan"])
  assert r["shards"]["layers.0.mlp.down_proj.kernel"]["shard"] == [128, 8]  # embed over fsdp
  assert r["shards"]["layers.0.mlp.gate_proj.kernel"]["shard"] == [8, 128]


def test_create_sharded_equals_unsharded_init(results):
  r = next(r for r in results if "create_sharded_err" in r)
  assert r["create_sharded_err"] < 1e-7
  specs = r["create_sharded_specs"]
  assert specs["layers.1.mlp.experts.gate_proj"] == "P('expert', 'fsdp')"
  assert specs["norm.scale"] == "P()"
