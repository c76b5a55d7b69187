"""`from_pretrained`: a released-layout safetensors directory or one of our Orbax checkpoints ->
model, on one device or placed on a mesh by the sharding rules while it is read."""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from deepseek_jax.config import DeepseekConfig
from deepseek_jax.params import model_from_flat


def _dequantize_kept_fp8(flat: Mapping[str, Any]) -> dict[str, Any]:
  """FP8 weights kept by the converter (`keep_fp8`) -> float32.

  Our layout stores a kept weight as float8_e4m3fn `w` [..., in, out] beside `w_scale_inv`
  [..., ceil(in/128), ceil(out/128)]; the float weight is
    W[..., i, o] = w[..., i, o] * scale_inv[..., i // 128, o // 128],
  the released 128 x 128 blocks (DeepSeek-V3 `weight_block_size`).
  """
  from convert import fp8
  block = fp8.DEFAULT_BLOCK
  out = {}
  for path, w in flat.items():
    if path.endswith(fp8.SCALE_SUFFIX):
      continue
    s = flat.get(path + fp8.SCALE_SUFFIX)
    if s is None:
      out[path] = w
      continue
    n_in, n_out = w.shape[-2:]
    want = fp8.scale_shape((n_in, n_out), block)
    if tuple(s.shape[-2:]) != want:
      raise ValueError(f"parameter {path + fp8.SCALE_SUFFIX}: shape {tuple(s.shape)}, expected "
                       f"[..., {want[0]}, {want[1]}] ({block[0]}x{block[1]} blocks of {path})")
    scale = jnp.repeat(jnp.repeat(s.astype(jnp.float32), block[0], axis=-2)[..., :n_in, :],
                       block[1], axis=-1)[..., :n_out]     # [..., in, out]
    out[path] = w.astype(jnp.float32) * scale
  return out


def from_pretrained(path: str | os.PathLike, *, dtype=jnp.bfloat16, param_dtype=None, mesh=None,
                    rules=None, **config_overrides):
  """The model stored in `path`.

  `path` is a released-layout directory (`config.json` plus `model.safetensors` or shards with
  `model.safetensors.index.json`; FP8 block-scaled weights are dequantized) or an Orbax checkpoint
  of ours (`python -m convert.hf_to_orbax`, or a trainer workdir).

  `dtype` is the compute dtype and, unless `param_dtype` says otherwise, the storage dtype.
  `mesh` (a `jax.sharding.Mesh` with axes data/fsdp/expert/tensor, see `sharding.make_mesh`)
  places every parameter by `rules` (default `sharding.DEFAULT_RULES`) as it is read: each device
  reads only its own shard, so no host ever holds the whole model. With `scan_layers=True` the
  per-layer arrays are then stacked on the mesh (transiently twice the layer weights).
  `config_overrides` replace config fields (e.g. `moe_dispatch="dense"`, `scan_layers=True`).
  """
  from deepseek_jax import checkpoint
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: not a directory")
  param_dtype = param_dtype or dtype
  orbax = checkpoint.is_orbax_checkpoint(path)
  cfg = checkpoint.read_config(path) if orbax else DeepseekConfig.from_hf(path)
  cfg = cfg.replace(**config_overrides) if config_overrides else cfg
  shardings = None
  if mesh is not None:
    from sharding import model_shardings
    table = model_shardings(cfg, mesh, rules)  # unrolled layout, what both loaders return
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shardings = lambda p: table.get(p, replicated)  # noqa: E731  (kept FP8 scales: replicated)
  if orbax:
    _, flat = checkpoint.restore_params(path, shardings=shardings, dtype=param_dtype)
    if any(p.endswith("_scale_inv") for p in flat):
      flat = _dequantize_kept_fp8(flat)
    loaded = cfg
  else:
    from convert.load import load_hf
    loaded, flat = load_hf(path, cfg, dtype=param_dtype, shardings=shardings)
  # the loader drops MTP layers the checkpoint does not hold; keep the caller's layout choices
  cfg = cfg.replace(num_nextn_predict_layers=loaded.num_nextn_predict_layers)
  model = model_from_flat(cfg, flat, dtype=dtype, param_dtype=param_dtype)
  if mesh is not None and cfg.scan_layers:
    from sharding import shard_model
    with jax.set_mesh(mesh):
      model = shard_model(model, mesh, rules)
  return model
