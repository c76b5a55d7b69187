"""The rules table, meshes and their errors (one process, no multi-device run needed)."""

from __future__ import annotations

import jax
import pytest
from jax.sharding import PartitionSpec as P

from deepseek_jax import sharding
from deepseek_jax import get_preset
from deepseek_jax.params import abstract_model, flat_state

AXES = ("data", "fsdp", "expert", "tensor")


def mesh_of(**sizes):
  return jax.sharding.AbstractMesh(tuple(sizes.get(a, 1) for a in AXES), AXES)


def test_logical_axes_of_the_table():
  la = sharding.logical_axes
  assert la("embed_tokens.embedding", 2) == ("vocab", "embed")
  assert la("layers.3.self_attn.q_b_proj.kernel", 2) == ("q_lora", "heads")
  assert la("layers.3.self_attn.kv_b_proj.kernel", 2) == ("kv_lora", "heads")
  assert la("layers.3.mlp.experts.down_proj", 3) == ("experts", "mlp", "embed")
  assert la("moe_layers.mlp.experts.gate_proj", 4) == ("layers", "experts", "embed", "mlp")
  assert la("layers.3.mlp.shared_experts.down_proj.kernel", 2) == ("mlp", "embed")
  assert la("layers.3.mlp.gate.kernel", 2) == ("embed", None)
  assert la("layers.3.mlp.gate.e_score_correction_bias", 1) == (None,)
  assert la("dense_layers.input_layernorm.scale", 2) == ("layers", None)
  with pytest.raises(ValueError, match="foo.kernel.*not in sharding.rules.PARAM_AXES"):
    la("foo.kernel", 2)


@pytest.mark.parametrize("preset", ["tiny_v3", "tiny_v2_lite", "deepseek_v3", "deepseek_v2"])
@pytest.mark.parametrize("scan", [False, True])
def test_every_parameter_has_a_spec(preset, scan):
  cfg = get_preset(preset, scan_layers=scan)
  if preset.startswith("deepseek"):
    cfg = cfg.replace(num_hidden_layers=cfg.first_k_dense_replace + 1)  # shapes only; fewer layers
  flat = flat_state(abstract_model(cfg))
  mesh = mesh_of(fsdp=2, expert=2 if cfg.n_routed_experts % 2 == 0 else 1, tensor=2)
  specs = sharding.param_shardings(flat, mesh)
  assert set(specs) == set(flat)
  for path, s in specs.items():
    if ".experts." in path:
      assert "expert" in tuple(s.spec), path


def test_spec_for_and_overrides():
  m = mesh_of(fsdp=2, expert=4, tensor=2)
  assert sharding.spec_for("layers.1.mlp.experts.gate_proj", (8, 64, 32), m) == \
      P("expert", "fsdp", "tensor")
  rules = sharding.parse_rules("experts=expert+fsdp,embed=none,vocab=none")
  assert rules["experts"] == ("expert", "fsdp") and rules["embed"] is None
  assert sharding.spec_for("layers.1.mlp.experts.gate_proj", (8, 64, 32), m, rules) == \
      P(("expert", "fsdp"), None, "tensor")
  # a mesh axis used by an earlier dimension is not reused
  rules = sharding.parse_rules("mlp=expert")
  assert sharding.spec_for("layers.1.mlp.experts.up_proj", (8, 64, 32), m, rules) == \
      P("expert", "fsdp")
  with pytest.raises(ValueError, match="mesh has no axis 'pipe'"):
    sharding.spec_for("lm_head.kernel", (64, 512), m, sharding.parse_rules("vocab=pipe"))
  with pytest.raises(ValueError, match="expected logical=mesh_axis"):
    sharding.parse_rules("experts")


def test_indivisible_axis_names_parameter_and_axis():
  with pytest.raises(ValueError, match=r"layers\.1\.mlp\.experts\.gate_proj .*experts dimension "
                     r"of size 8 is not divisible by mesh axis expert of size 3"):
    sharding.spec_for("layers.1.mlp.experts.gate_proj", (8, 64, 32), mesh_of(expert=3))


def test_make_mesh_on_one_device_and_errors():
  mesh = sharding.make_mesh()
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert dict(sharding.make_mesh(data=-1).shape)["data"] == jax.device_count()
  n = jax.device_count()
  with pytest.raises(ValueError, match=rf"fsdp=2, expert={n + 1}, tensor=1: the axes' product is "
                     rf"{2 * (n + 1)} but there are {n} devices"):
    sharding.make_mesh(fsdp=2, expert=n + 1)
  with pytest.raises(ValueError, match="at most one -1"):
    sharding.make_mesh(data=-1, fsdp=-1)
  assert sharding.parse_mesh("data=1,fsdp=64,expert=4") == \
      {"data": 1, "fsdp": 64, "expert": 4, "tensor": 1}
  with pytest.raises(ValueError, match="--mesh item 'pipe=2'"):
    sharding.parse_mesh("pipe=2")


def test_make_mesh_fake_devices_reshape():
  class Dev:
    platform = "cpu"
    def __init__(self, i):
      self.id = i
  devs = [Dev(i) for i in range(8)]
  # product mismatch names the axes and the device count
  with pytest.raises(ValueError, match=r"data=3, fsdp=1, expert=1, tensor=1: the axes' product is "
                     r"3 but there are 8 devices"):
    sharding.make_mesh(data=3, devices=devs)
  with pytest.raises(ValueError, match="the fixed axes' product 3 does not divide the 8 devices"):
    sharding.make_mesh(data=-1, tensor=3, devices=devs)


def test_activation_spec_leaves_out_what_does_not_split():
  m = mesh_of(data=2, fsdp=4, tensor=2)
  spec = sharding.activation_spec
  assert spec(("batch", "length", "embed"), (16, 32, 64), m) == P(("data", "fsdp"), None, None)
  assert spec(("batch", "length", "heads", None), (8, 32, 4, 16), m) == \
      P(("data", "fsdp"), None, "tensor", None)
  # batch 2 splits over data only; fsdp then goes to embed (its rule), which it divides
  assert spec(("batch", "length", "embed"), (2, 1, 64), m) == P("data", None, "fsdp")
  assert spec(("batch", "length", "vocab"), (1, 1, 7), m) == P(None, None, None)
  with pytest.raises(ValueError, match="3 logical axes"):
    spec(("batch", "length", "embed"), (2, 64), m)
  x = jax.numpy.ones((2, 3))
  assert sharding.shard_activation(x, ("batch", "embed")) is x  # no mesh: untouched


class FakeDevice:
  platform = "cpu"
  device_kind = "cpu"

  def __init__(self, i, slice_index=None, process_index=0):
    self.id = i
    self.process_index = process_index
    if slice_index is not None:
      self.slice_index = slice_index

  def __repr__(self):
    return f"D{self.id}"


def test_device_grid_slices_and_processes():
  sizes = {"data": 2, "fsdp": 2, "expert": 2, "tensor": 1}
  # two slices of 4: data spans the slices, the other axes stay within a slice
  devs = [FakeDevice(i, slice_index=i // 4) for i in range(8)]
  grid = sharding.device_grid(sizes, devs[::-1])
  assert grid.shape == (2, 2, 2, 1)
  assert {d.slice_index for d in grid[0].flat} == {0} and {d.slice_index for d in grid[1].flat} == {1}
  # expert across the slices instead
  grid = sharding.device_grid(sizes, devs, dcn={"expert": 2})
  assert all({d.slice_index for d in grid[:, :, e].flat} == {e} for e in range(2))
  # processes as granules where devices have no slices (GPU clusters, CPU processes)
  devs = [FakeDevice(i, process_index=i % 2) for i in range(8)]
  grid = sharding.device_grid(sizes, devs, dcn={"data": 2})
  assert all({d.process_index for d in grid[p].flat} == {p} for p in range(2))
  with pytest.raises(ValueError, match=r"dcn \{'data': 4\}: its product 4 must equal the 2 "
                     "processes"):
    sharding.device_grid(sizes, devs, dcn={"data": 4})
  with pytest.raises(ValueError, match=r"axes \['tensor'\] do not divide"):
    sharding.device_grid(sizes, devs, dcn={"tensor": 2})
  with pytest.raises(ValueError, match=r"unknown axes \['pipe'\]"):
    sharding.device_grid(sizes, devs, dcn={"pipe": 2})
