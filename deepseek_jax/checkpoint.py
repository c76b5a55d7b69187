"""Our checkpoint format: `config.json` plus an Orbax PyTree of the parameters, and readers for it
and for a trainer workdir.

Layout of a model checkpoint directory:
  config.json     the architecture (`DeepseekConfig.to_hf()`; read back with `from_hf`)
  params/         an Orbax checkpoint whose PyTree is the nested parameter dict in the unrolled
                  layout (`{"layers": {"0": {"self_attn": {...}}}, "embed_tokens": {...}}`)

Saving streams: parameters arrive one at a time (a dict or an iterator of (path, array)) and go to
disk in groups with Orbax partial saves, so host memory holds one group, never the model. The
directory appears at once (written under a temporary name, renamed at the end).

A trainer workdir (`<workdir>/checkpoints/<step>/state`, see `deepseek_jax.trainer`) is read too:
its latest step's parameters and router biases.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import DeepseekConfig

log = logging.getLogger(__name__)

PARAMS_DIR = "params"
CONFIG_NAME = "config.json"
_GROUP_BYTES = 256 * 2**20
Shardings = Mapping[str, jax.sharding.Sharding] | Callable[[str], jax.sharding.Sharding] | None


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


def nest(flat: Mapping[str, Any]) -> dict:
  """{dotted path: leaf} -> nested dict with string keys (Orbax's tree)."""
  tree: dict = {}
  for path, v in flat.items():
    node = tree
    parts = path.split(".")
    for p in parts[:-1]:
      node = node.setdefault(p, {})
      if not isinstance(node, dict):
        raise ValueError(f"parameter path {path!r} runs through a leaf")
    if parts[-1] in node:
      raise ValueError(f"parameter path {path!r} given twice or is a prefix of another")
    node[parts[-1]] = v
  return tree


def _nbytes(x) -> int:
  return int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize


# ------------------------------------------------------------------------------ detection
def _params_item(directory: str) -> str:
  """The Orbax PyTree directory inside `params/` (partial saves put it under `state/`)."""
  root = os.path.join(directory, PARAMS_DIR)
  sub = os.path.join(root, "state")
  return sub if os.path.isdir(sub) else root


def _trainer_dir(path: str) -> str | None:
  """The trainer's checkpoints directory for a workdir or the checkpoints directory itself."""
  for d in (os.path.join(path, "checkpoints"), path):
    if os.path.isdir(d) and any(n.isdigit() and os.path.isdir(os.path.join(d, n, "state"))
                                for n in os.listdir(d)):
      return d
  return None


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
  """Whether `path` is one of our model checkpoints or a trainer workdir (or its checkpoints/)."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    return False
  if os.path.isfile(os.path.join(path, CONFIG_NAME)) and os.path.isdir(os.path.join(path, PARAMS_DIR)):
    return True
  return _trainer_dir(path) is not None


# ------------------------------------------------------------------------------ saving
def _groups(items: Iterable[tuple[str, Any]], group_bytes: int) -> Iterator[dict[str, Any]]:
  group: dict[str, Any] = {}
  size = 0
  for path, value in items:
    n = _nbytes(value)
    if group and size + n > group_bytes:
      yield group
      group, size = {}, 0
    group[path] = value
    size += n
  if group:
    yield group


def save_params(directory: str | os.PathLike, cfg: DeepseekConfig,
                params: Mapping[str, Any] | Iterable[tuple[str, Any]], *, overwrite: bool = False,
                group_bytes: int = _GROUP_BYTES, compress: bool = False,
                on_saved: Callable[[dict[str, Any]], None] | None = None) -> str:
  """Writes `config.json` and the parameters (flat or nested dict, or an iterator of
  (dotted path, array) pairs consumed lazily) as one of our checkpoints; returns its path.

  Parameters are saved in groups of about `group_bytes`; one group is written in the background
  while the next is gathered, then released. `compress` turns on Orbax's zstd (weights hardly
  compress; off, saving is about 3x faster). Refuses a non-empty `directory` unless `overwrite`;
  on error nothing is left behind.
  """
  import orbax.checkpoint as ocp

  from convert.safetensors_io import commit_output, prepare_output
  directory = os.path.abspath(os.fspath(directory))
  if isinstance(params, Mapping):
    params = flatten(params).items()
  opts = ocp.v1.options
  ctx = ocp.v1.Context(array_options=opts.ArrayOptions(
      saving=opts.ArrayOptions.Saving(use_compression=compress)))
  tmp = prepare_output(directory, overwrite)
  pending = None

  def finish(p):
    response, group = p
    response.result()
    if on_saved is not None:
      on_saved(group)
    for v in group.values():
      if isinstance(v, jax.Array):
        v.delete()

  try:
    cfg.replace(scan_layers=False).save(tmp)
    target = os.path.join(tmp, PARAMS_DIR)
    seen: set[str] = set()
    with ctx:
      for group in _groups(params, group_bytes):
        dup = seen & set(group)
        if dup:
          raise ValueError(f"parameter {sorted(dup)[0]!r} given twice")
        seen |= set(group)
        if pending is not None:  # at most one group in flight
          finish(pending)
        pending = (ocp.v1.partial.save_async(target, nest(group)), group)
        del group
      if pending is not None:
        finish(pending)
        pending = None
      if not seen:
        raise ValueError(f"{directory}: no parameters to save")
      ocp.v1.partial.finalize(target)
    commit_output(tmp, directory)
  except BaseException:
    if pending is not None:
      try:
        pending[0].result()
      except Exception:  # the original error matters more
        pass
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return directory


# ------------------------------------------------------------------------------ reading
def read_config(directory: str | os.PathLike) -> DeepseekConfig:
  """The config of one of our checkpoints or of a trainer workdir."""
  directory = os.fspath(directory)
  if os.path.isfile(os.path.join(directory, CONFIG_NAME)):
    return DeepseekConfig.from_hf(os.path.join(directory, CONFIG_NAME))
  tdir = _trainer_dir(directory)
  if tdir is None:
    raise FileNotFoundError(f"{directory}: not an Orbax checkpoint of ours (config.json + "
                            f"{PARAMS_DIR}/) nor a trainer workdir")
  from deepseek_jax.trainer import Checkpointer
  ckpt = Checkpointer(tdir, 1, create=False)
  try:
    return ckpt.saved_config()
  finally:
    ckpt.close()


def param_metadata(directory: str | os.PathLike) -> dict[str, jax.ShapeDtypeStruct]:
  """{path: shape and dtype} of our checkpoint's parameters (no array is read)."""
  import orbax.checkpoint as ocp
  directory = os.fspath(directory)
  meta = ocp.v1.metadata(os.path.join(directory, PARAMS_DIR)).metadata
  return {k: jax.ShapeDtypeStruct(tuple(v.shape), v.dtype) for k, v in flatten(meta).items()}


def _cast_to(path: str, stored, dtype):
  """The dtype a parameter is restored in: `dtype` for float weights; the router bias, FP8
  weights and their scales keep theirs."""
  if dtype is None or path.endswith(("e_score_correction_bias", "_scale_inv")):
    return np.dtype(stored)
  if np.dtype(stored) == np.dtype(jnp.float8_e4m3fn):
    return np.dtype(stored)
  return np.dtype(dtype)


def read_params_numpy(directory: str | os.PathLike, paths: Iterable[str]) -> dict[str, np.ndarray]:
  """Some parameters of our checkpoint as numpy arrays in their stored dtype (partial read)."""
  import orbax.checkpoint as ocp
  paths = list(paths)
  tree = nest({p: np.zeros(()) for p in paths})
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  with ocp.PyTreeCheckpointer() as c:
    out = c.restore(_params_item(os.fspath(directory)),
                    args=ocp.args.PyTreeRestore(item=tree, restore_args=args, partial_restore=True))
  return {p: v for p, v in flatten(out).items()}


def restore_params(directory: str | os.PathLike, *, shardings: Shardings = None, dtype=None,
                   mesh=None) -> tuple[DeepseekConfig, dict[str, jax.Array]]:
  """(config, {dotted path: jax.Array}) of one of our checkpoints or a trainer workdir's latest
  step (unrolled layout).

  `shardings` (dict or callable, path -> Sharding) places each parameter; without it they are
  replicated over `mesh`, else put on the first device. `dtype` casts float weights (the router
  bias stays float32; kept FP8 weights and scales stay as stored); None keeps the stored dtypes.
  """
  import orbax.checkpoint as ocp

  from convert.load import resolve_sharding
  directory = os.path.abspath(os.fspath(directory))
  if not is_orbax_checkpoint(directory):
    raise FileNotFoundError(f"{directory}: not an Orbax checkpoint of ours (config.json + "
                            f"{PARAMS_DIR}/) nor a trainer workdir")
  cfg = read_config(directory)
  if not os.path.isdir(os.path.join(directory, PARAMS_DIR)):
    return cfg, _restore_trainer(directory, cfg, shardings=shardings, dtype=dtype, mesh=mesh)
  meta = param_metadata(directory)
  abstract = {p: jax.ShapeDtypeStruct(m.shape, _cast_to(p, m.dtype, dtype),
                                      sharding=resolve_sharding(shardings, mesh, p))
              for p, m in meta.items()}
  tree = ocp.v1.load(os.path.join(directory, PARAMS_DIR), nest(abstract))
  return cfg, flatten(tree)


def _restore_trainer(directory: str, cfg: DeepseekConfig, *, shardings, dtype, mesh
                     ) -> dict[str, jax.Array]:
  from convert.load import resolve_sharding
  from deepseek_jax.params import flat_state
  from deepseek_jax.trainer import load_model
  model = load_model(_trainer_dir(directory), cfg)  # the latest step, float32
  out = {}
  for p, v in flat_state(model).items():
    v = v.astype(_cast_to(p, v.dtype, dtype))
    out[p] = jax.device_put(v, resolve_sharding(shardings, mesh, p))
  return out


def restore_model(directory: str | os.PathLike, *, dtype=jnp.float32, param_dtype=None,
                  **config_overrides):
  """The model of one of our checkpoints (or a trainer workdir): `dtype` compute, `param_dtype`
  storage (default `dtype`), config fields replaced by `config_overrides`. The same loader as
  `deepseek_jax.from_pretrained` (kept FP8 weights dequantized)."""
  from deepseek_jax.pretrained import from_pretrained
  if not is_orbax_checkpoint(directory):
    raise FileNotFoundError(f"{directory}: not an Orbax checkpoint of ours (config.json + "
                            f"{PARAMS_DIR}/) nor a trainer workdir")
  return from_pretrained(directory, dtype=dtype, param_dtype=param_dtype, **config_overrides)
