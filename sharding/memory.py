"""Memory plan: per-device bytes of a model on a mesh, and whether it fits a device.

Command line (`python -m deepseek_jax.sharding.plan`):
  python -m deepseek_jax.sharding.plan --preset=deepseek_v3 --mesh=fsdp=64,expert=4 --batch=256 \
      --seq_len=4096 --train --device=v5p

Per device (elements of each parameter divided by the mesh axes the rules shard it over):
  parameters  = sum_params shard_elements * param_bytes;
  gradients   = parameters (same dtype and sharding) when training;
  optimizer   = AdamW, sharded like the parameters: two float32 moments (8 bytes per element)
                plus a float32 master copy (4 more) when param_bytes < 4;
  activations = an estimate, with b = batch / S sequences and t = b * seq_len tokens per device
                (S: the product of the mesh axes the "batch" rule names, by default
                data * fsdp * expert), h = heads / tensor, a = 2 bytes:
    training (each layer rematerialised):  L * t * D * a  (saved layer inputs)
                                         + one layer's working set, twice (forward and backward);
    inference: one layer's working set, plus the MLA cache b * seq_len * (Rkv + dr) * L * a;
    working set of a layer = t * D * 4 * a (residual, norm, attention output, MLP output)
                           + t * h * (2 * (dn + dr) + 2 * dv) * a (q, k, v and attention output)
                           + b * h * seq_len^2 * 4 (float32 scores)
                           + t * K * (D + 3 * Ie) * a (routed copies; dense layers: 3 * I / tensor)
    plus the logits t * V / tensor * 4 bytes, twice when training (logits and their gradient).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax.config import DeepseekConfig
from deepseek_jax.layers import LoRAParam
from deepseek_jax.params import abstract_model, flat_state, flatten
from deepseek_jax.sharding.mesh import AXES
from deepseek_jax.sharding.rules import DEFAULT_RULES, MeshAxes, _as_tuple, spec_for

GiB = 1024 ** 3

# Memory per device (chip / GPU), bytes.
DEVICE_MEMORY = {"v5e": 16 * GiB, "v5p": 95 * GiB, "v6e": 32 * GiB, "h100": 80 * GiB,
                 "h200": 141 * GiB}
# TPU slice names count TensorCores: v5p has two per chip ("v5p-256" is 128 chips).
CORES_PER_CHIP = {"v5p": 2}
_UNITS = {"gib": GiB, "gb": 10 ** 9, "mib": 1024 ** 2, "mb": 10 ** 6, "b": 1, "": 1}


@dataclasses.dataclass(frozen=True)
class Plan:
  """Per-device bytes (see the module docstring for the formulas)."""
  mesh_shape: dict[str, int]
  param_elements: int        # per device
  params: int
  gradients: int
  optimizer: int
  activations: int

  @property
  def total(self) -> int:
    return self.params + self.gradients + self.optimizer + self.activations

  def fits(self, device: str | int) -> bool:
    """Whether the total fits a device memory (a name from DEVICE_MEMORY, or bytes)."""
    return self.total <= device_memory(device)

  def table(self) -> str:
    rows = [("parameters", self.params), ("gradients", self.gradients),
            ("optimizer", self.optimizer), ("activations", self.activations),
            ("total", self.total)]
    mesh = " x ".join(f"{a} {s}" for a, s in self.mesh_shape.items() if s > 1) or "one device"
    lines = [f"per device on {mesh} ({math.prod(self.mesh_shape.values())} devices):"]
    lines += [f"  {name:<12}{b / GiB:10.2f} GiB" for name, b in rows]
    return "\n".join(lines)


def device_memory(device: str | int) -> int:
  """Bytes of one device: a name ("v5p", "v5p-256", "h100"), a size ("95GiB", "80GB") or bytes."""
  if isinstance(device, int):
    return device
  text = device.strip().lower()
  number = text.rstrip("abcdefghijklmnopqrstuvwxyz ")
  if number and number[0].isdigit():
    unit = text[len(number):].strip()
    if unit not in _UNITS:
      raise ValueError(f"device memory {device!r}: unknown unit {unit!r}; expected one of "
                       "GiB, GB, MiB, MB, B")
    return int(float(number) * _UNITS[unit])
  key = text.split("-")[0]
  if key not in DEVICE_MEMORY:
    raise ValueError(f"--device={device}: unknown; expected one of {sorted(DEVICE_MEMORY)} "
                     "(optionally with a slice size, v5p-256) or a size such as 95GiB")
  return DEVICE_MEMORY[key]


def slice_devices(name: str) -> int | None:
  """Devices (chips) of a slice name: "v5p-256" -> 128, "v6e-64" -> 64, "h100-8" -> 8; None
  without a count."""
  key, sep, count = name.lower().partition("-")
  if not sep:
    return None
  if not count.isdigit() or key not in DEVICE_MEMORY:
    raise ValueError(f"--device={name}: expected NAME-COUNT with NAME one of "
                     f"{sorted(DEVICE_MEMORY)}")
  cores = CORES_PER_CHIP.get(key, 1)
  if int(count) % cores:
    raise ValueError(f"--device={name}: {key} counts {cores} cores per chip; {count} is not a "
                     "whole number of chips")
  return int(count) // cores


def batch_shards(mesh_shape: Mapping[str, int], rules: Mapping[str, MeshAxes] | None = None
                 ) -> int:
  """How many ways the batch splits: the product of the mesh axes of the "batch" rule."""
  sizes = _mesh_shape(mesh_shape)
  axes = _as_tuple((DEFAULT_RULES if rules is None else rules).get("batch"))
  return math.prod(sizes[a] for a in axes)


def _mesh_shape(mesh_shape: Mapping[str, int]) -> dict[str, int]:
  unknown = set(mesh_shape) - set(AXES)
  if unknown:
    raise ValueError(f"mesh {dict(mesh_shape)}: unknown axes {sorted(unknown)}; expected {AXES}")
  return {a: int(mesh_shape.get(a, 1)) for a in AXES}


def shard_sizes(cfg: DeepseekConfig, mesh_shape: Mapping[str, int],
                rules: Mapping[str, MeshAxes] | None = None, *, param_dtype=jnp.bfloat16
                ) -> dict[str, tuple[int, int, bool]]:
  """{path: (elements of its shard on one device, bytes per element, is a LoRA adapter)} of every
  variable (stacked layout; shapes and dtypes from the abstract model, nothing allocated)."""
  sizes = _mesh_shape(mesh_shape)
  mesh = jax.sharding.AbstractMesh(tuple(sizes[a] for a in AXES), AXES)
  abstract = abstract_model(cfg.replace(scan_layers=True), param_dtype=param_dtype)
  lora = set(flatten(nnx.to_pure_dict(nnx.state(abstract, LoRAParam))))
  out = {}
  for path, v in flat_state(abstract).items():
    n = math.prod(v.shape)
    for axes in spec_for(path, tuple(v.shape), mesh, rules):
      for a in (() if axes is None else (axes,) if isinstance(axes, str) else axes):
        n //= sizes[a]
    out[path] = (n, np.dtype(v.dtype).itemsize, path in lora)
  return out


def param_elements_per_device(cfg: DeepseekConfig, mesh_shape: Mapping[str, int],
                              rules: Mapping[str, MeshAxes] | None = None) -> int:
  """Elements of every variable's shard on one device."""
  return sum(n for n, _, _ in shard_sizes(cfg, mesh_shape, rules).values())


def activation_bytes(cfg: DeepseekConfig, mesh_shape: Mapping[str, int], batch: int,
                     seq_len: int, *, training: bool = True, act_bytes: int = 2,
                     rules: Mapping[str, MeshAxes] | None = None) -> int:
  """The activation estimate of the module docstring."""
  sizes = _mesh_shape(mesh_shape)
  b = batch / batch_shards(sizes, rules)
  t = b * seq_len
  tp = sizes["tensor"]
  h = cfg.num_attention_heads / tp
  a = act_bytes
  attn = t * h * (2 * cfg.qk_head_dim + 2 * cfg.v_head_dim) * a + b * h * seq_len ** 2 * 4
  if cfg.is_moe:
    mlp = t * cfg.num_experts_per_tok * (cfg.hidden_size + 3 * cfg.moe_intermediate_size) * a
  else:
    mlp = 0
  mlp = max(mlp, t * 3 * cfg.intermediate_size / tp * a)
  layer = t * cfg.hidden_size * 4 * a + attn + mlp
  logits = t * cfg.vocab_size / tp * 4
  if training:
    return int(cfg.num_hidden_layers * t * cfg.hidden_size * a + 2 * layer + 2 * logits)
  cache = b * seq_len * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * a
  return int(layer + logits + cache)


def memory_plan(config: DeepseekConfig, mesh_shape: Mapping[str, int], batch: int, seq_len: int, *,
                training: bool = True, param_bytes: int = 2, lora_rank: int = 0,
                weight_quant: str = "none",
                rules: Mapping[str, MeshAxes] | None = None) -> Plan:
  """Per-device memory of `config` on a mesh of `mesh_shape` ({"fsdp": 64, "expert": 4}; axes
  not given are 1) for `batch` sequences of `seq_len` tokens.

  Full training or inference: every parameter in `param_bytes`. With `lora_rank` (LoRA
  fine-tuning of a frozen base, `config.lora_targets`) or `weight_quant` ("int8", "fp8": the
  frozen base stored so, with its scales), each variable counts in its own dtype (the base in
  `param_bytes`, adapters float32), and gradients and AdamW moments exist for the adapters only.
  """
  sizes = _mesh_shape(mesh_shape)
  cfg = config.replace(lora_rank=lora_rank, weight_quant=weight_quant)
  dtypes = {1: jnp.float8_e4m3fn, 2: jnp.bfloat16, 4: jnp.float32}
  if param_bytes not in dtypes:
    raise ValueError(f"param_bytes={param_bytes}: expected 1 (fp8), 2 (bfloat16) or 4 (float32)")
  dtype = dtypes[param_bytes]
  table = shard_sizes(cfg, sizes, rules, param_dtype=dtype)  # raises on indivisible params
  shards = batch_shards(sizes, rules)
  if batch % shards:
    axes = " x ".join(_as_tuple((DEFAULT_RULES if rules is None else rules).get("batch")))
    raise ValueError(f"batch={batch} is not divisible by {axes} = {shards} (the batch rule's "
                     "mesh axes)")
  acts = activation_bytes(config, sizes, batch, seq_len, training=training, rules=rules)
  elements = sum(n for n, _, _ in table.values())
  if not lora_rank and weight_quant == "none":  # every parameter in param_bytes, all trained
    params = elements * param_bytes
    grads = params if training else 0
    opt = elements * (8 + (4 if param_bytes < 4 else 0)) if training else 0
    return Plan(sizes, elements, params, grads, opt, acts)
  params = sum(n * b for n, b, _ in table.values())
  trained = sum(n for n, _, lora in table.values() if lora)
  grads = trained * 4 if training else 0
  opt = trained * 8 if training else 0
  return Plan(sizes, elements, params, grads, opt, acts)
