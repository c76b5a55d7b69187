"""Logical axis names for every parameter, and the one table mapping them to mesh axes.

Two steps, kept apart so that a flag can re-map without touching the model:
  PARAM_AXES    parameter-path suffix -> logical axis per dimension (kernels are [in, out]);
  DEFAULT_RULES logical axis -> mesh axis (or axes, or None for replicated).
Norm scales, biases and router biases are replicated. Stacked layers (`dense_layers.*`,
`moe_layers.*` of `scan_layers`) get a leading "layers" axis.
A fused [in, H*d] projection is sharded along its fused output: a split over heads as long as
the mesh axis divides it.
Activations use the same logical names (batch, length, embed, heads, mlp, vocab, experts):
`shard_activation(x, ("batch", "length", "embed"))` pins an intermediate's sharding inside a
model; it does nothing outside a mesh.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
from jax.sharding import NamedSharding, PartitionSpec

# Suffix (after the last layer index) -> logical axes of the parameter's dimensions.
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    ("embed_tokens.embedding", ("vocab", "embed")),            # [V, D]
    ("lm_head.kernel", ("embed", "vocab")),                    # [D, V]
    ("self_attn.q_proj.kernel", ("embed", "heads")),           # [D, H*(dn+dr)]
    ("q_a_proj.kernel", ("embed", "q_lora")),                  # [D, Rq]
    ("q_b_proj.kernel", ("q_lora", "heads")),                  # [Rq, H*(dn+dr)]
    ("kv_a_proj_with_mqa.kernel", ("embed", "kv_lora")),       # [D, Rkv+dr]
    ("kv_b_proj.kernel", ("kv_lora", "heads")),                # [Rkv, H*(dn+dv)]
    ("o_proj.kernel", ("heads", "embed")),                     # [H*dv, D]
    ("experts.gate_proj", ("experts", "embed", "mlp")),        # [E, D, I]
    ("experts.up_proj", ("experts", "embed", "mlp")),          # [E, D, I]
    ("experts.down_proj", ("experts", "mlp", "embed")),        # [E, I, D]
    ("gate_proj.kernel", ("embed", "mlp")),                    # [D, I] dense and shared experts
    ("up_proj.kernel", ("embed", "mlp")),                      # [D, I]
    ("down_proj.kernel", ("mlp", "embed")),                    # [I, D]
    ("gate.kernel", ("embed", None)),                          # [D, E] router
    ("eh_proj.kernel", (None, "embed")),                       # [2D, D] MTP
)

MeshAxes = str | tuple[str, ...] | None

DEFAULT_RULES: dict[str, MeshAxes] = {
    # parameters
    "vocab": "tensor", "embed": "fsdp", "heads": "tensor", "mlp": "tensor", "experts": "expert",
    "q_lora": "fsdp", "kv_lora": "fsdp", "layers": None,  # (unused where embed already took fsdp)
    # activations
    # the expert axis splits the batch too (each expert group works on its own tokens outside
    # the routed experts, and expert_parallel_moe splits tokens over it)
    "batch": ("data", "fsdp", "expert"), "length": None,
}

STACKS = ("dense_layers.", "moe_layers.")


def parse_rules(text: str, base: Mapping[str, MeshAxes] | None = None) -> dict[str, MeshAxes]:
  """Overrides from a flag: `"experts=expert,embed=fsdp,batch=data+fsdp,q_lora=none"`."""
  rules = dict(DEFAULT_RULES if base is None else base)
  for item in filter(None, (s.strip() for s in text.split(","))):
    name, sep, value = (p.strip() for p in item.partition("="))
    if not sep or not name:
      raise ValueError(f"sharding rule {item!r}: expected logical=mesh_axis (e.g. experts=expert)")
    parts = [p for p in value.split("+") if p]
    if value.lower() in ("", "none") or not parts:
      rules[name] = None
    else:
      rules[name] = parts[0] if len(parts) == 1 else tuple(parts)
  return rules


# Variables derived from a weight W [..., in, out]: its LoRA adapter A [..., in, r] and
# B [..., r, out] follow W's sharding on the axes they share; quantization scales are split only
# along the experts (their other dimensions are per channel or per 128-block, small).
_DERIVED = ((".lora_a", ".kernel", "a"), (".lora_b", ".kernel", "b"),
            (".kernel_scale", ".kernel", "scale"), ("_lora_a", "", "a"), ("_lora_b", "", "b"),
            ("_scale", "", "scale"))


def _table_axes(path: str) -> tuple[str | None, ...] | None:
  """The PARAM_AXES entry whose suffix `path` ends with (no leading layers axis), or None."""
  for suffix, axes in PARAM_AXES:
    if path == suffix or path.endswith("." + suffix):
      return axes
  return None


def _derived_axes(path: str, ndim: int) -> tuple[str | None, ...] | None:
  """Axes of an adapter or a scale from its weight's (see _DERIVED); None for other paths."""
  for suffix, base_suffix, kind in _DERIVED:
    base = path[:-len(suffix)] + base_suffix
    if not path.endswith(suffix) or _table_axes(base) is None:
      continue
    lead = (("layers",) if path.startswith(STACKS) else ()) + _table_axes(base)[:-2]
    ax_in, ax_out = _table_axes(base)[-2:]
    if kind == "a":
      return lead + (ax_in, None)
    if kind == "b":
      return lead + (None, ax_out)
    keep = tuple(a if a in ("layers", "experts") else None for a in lead)
    return keep + (None,) * (ndim - len(keep))
  return None


def logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
  """Logical axis names of the parameter at dotted `path` with `ndim` dimensions."""
  derived = _derived_axes(path, ndim)
  if derived is not None:
    if len(derived) != ndim:
      raise ValueError(f"parameter {path}: {ndim} dimensions, but its weight's axes give "
                       f"{derived}")
    return derived
  stacked = path.startswith(STACKS)
  base_ndim = ndim - 1 if stacked else ndim
  axes = _table_axes(path)
  if axes is not None:
    if len(axes) != base_ndim:
      raise ValueError(f"parameter {path}: {ndim} dimensions, but the rules table gives it the "
                       f"axes {axes}{' plus a leading layers axis' if stacked else ''}")
  else:
    if base_ndim > 1:
      raise ValueError(f"parameter {path}: {ndim}-D and not in sharding.rules.PARAM_AXES; add "
                       "its logical axes to the table")
    axes = (None,) * base_ndim  # norm scales and biases: replicated
  return (("layers",) if stacked else ()) + tuple(axes)


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def spec_for(path: str, shape: tuple[int, ...], mesh: jax.sharding.Mesh,
             rules: Mapping[str, MeshAxes] | None = None) -> PartitionSpec:
  """The PartitionSpec of one parameter. A mesh axis already used by an earlier dimension is not
  used again (that dimension stays whole). Raises ValueError naming the parameter, the axis and
  the sizes when the mesh axes do not divide the dimension."""
  rules = DEFAULT_RULES if rules is None else rules
  used: set[str] = set()
  spec = []
  for dim, name in zip(shape, logical_axes(path, len(shape))):
    axes = tuple(a for a in _as_tuple(rules.get(name)) if a not in used) if name else ()
    for a in axes:
      if a not in mesh.shape:
        raise ValueError(f"sharding rule {name}={a}: the mesh has no axis {a!r} "
                         f"(axes {tuple(mesh.shape)})")
    size = math.prod(mesh.shape[a] for a in axes)
    if dim % size:
      raise ValueError(f"parameter {path} {tuple(shape)}: its {name} dimension of size {dim} is "
                       f"not divisible by mesh axis {'×'.join(axes)} of size {size}")
    axes = tuple(a for a in axes if mesh.shape[a] > 1)
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  while spec and spec[-1] is None:
    spec.pop()
  return PartitionSpec(*spec)


def param_shardings(flat_shapes: Mapping[str, object], mesh: jax.sharding.Mesh,
                    rules: Mapping[str, MeshAxes] | None = None) -> dict[str, NamedSharding]:
  """{path: NamedSharding} for {path: anything with .shape (arrays, ShapeDtypeStructs) or a
  shape tuple}."""
  out = {}
  for path, v in flat_shapes.items():
    shape = tuple(v) if isinstance(v, (tuple, list)) else tuple(v.shape)
    out[path] = NamedSharding(mesh, spec_for(path, shape, mesh, rules))
  return out


def batch_spec(rules: Mapping[str, MeshAxes] | None = None, ndim: int = 2) -> PartitionSpec:
  """Activations [batch, ...]: the batch dimension over the rules' "batch" axes."""
  axes = _as_tuple((DEFAULT_RULES if rules is None else rules).get("batch"))
  lead = None if not axes else axes[0] if len(axes) == 1 else axes
  return PartitionSpec(lead, *([None] * (ndim - 1)))


def activation_spec(names: tuple[str | None, ...], shape: tuple[int, ...],
                    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh,
                    rules: Mapping[str, MeshAxes] | None = None) -> PartitionSpec:
  """The PartitionSpec of an activation with logical axes `names` (one per dimension).

  Unlike parameters, activations change shape (a decode step has one token, a small batch may
  not split): a mesh axis that is absent, of size 1, already used, or that does not divide the
  dimension is left out (that dimension stays whole along it) instead of raising.
  """
  if len(names) != len(shape):
    raise ValueError(f"activation of shape {tuple(shape)}: {len(names)} logical axes {names}")
  rules = DEFAULT_RULES if rules is None else rules
  used: set[str] = set()
  spec = []
  for dim, name in zip(shape, names):
    axes = []
    for a in _as_tuple(rules.get(name)) if name else ():
      size = math.prod(mesh.shape[b] for b in axes) * mesh.shape.get(a, 1)
      if a in mesh.shape and mesh.shape[a] > 1 and a not in used and dim % size == 0:
        axes.append(a)
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  return PartitionSpec(*spec)


def shard_activation(x: jax.Array, names: tuple[str | None, ...],
                     rules: Mapping[str, MeshAxes] | None = None) -> jax.Array:
  """`x` constrained to the sharding its logical axes give under the current mesh
  (`jax.set_mesh`); `x` itself when there is no mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, activation_spec(names, x.shape, mesh, rules))
