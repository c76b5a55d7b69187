"""Our model checkpoint format: `config.json` plus an Orbax PyTree of the parameters.

Layout of a model checkpoint directory:
  config.json     the architecture (`DeepseekConfig.to_hf()`; read back with `from_hf`)
  params/         an Orbax checkpoint whose PyTree is the nested parameter dict in the unrolled
                  layout (`{"layers": {"0": {"self_attn": {...}}}, "embed_tokens": {...}}`)

Saving streams: parameters arrive one at a time (a dict or an iterator of (path, array)) and go to
disk in groups with Orbax partial saves, so host memory holds one group, never the model. The
directory appears at once (written under a temporary name, renamed at the end). Reading returns
flat {dotted path: array} dicts and never builds a model (`deepseek_jax.from_pretrained` does).
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from deepseek_jax.config import DeepseekConfig
from deepseek_jax.convert.atomic import commit_output, prepare_output
from deepseek_jax.params import flatten, unflatten

PARAMS_DIR = "params"
CONFIG_NAME = "config.json"
_GROUP_BYTES = 256 * 2**20


def _nbytes(x) -> int:
  return int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize


def is_model_checkpoint(path: str | os.PathLike) -> bool:
  """Whether `path` is one of our model checkpoints (config.json + params/)."""
  path = os.fspath(path)
  return (os.path.isfile(os.path.join(path, CONFIG_NAME))
          and os.path.isdir(os.path.join(path, PARAMS_DIR)))


def _params_item(directory: str) -> str:
  """The Orbax PyTree directory inside `params/` (partial saves put it under `state/`)."""
  root = os.path.join(directory, PARAMS_DIR)
  sub = os.path.join(root, "state")
  return sub if os.path.isdir(sub) else root


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


def save_params(directory: str | os.PathLike, cfg: DeepseekConfig | None,
                params: Mapping[str, Any] | Iterable[tuple[str, Any]], *, overwrite: bool = False,
                group_bytes: int = _GROUP_BYTES, compress: bool = False,
                on_saved: Callable[[dict[str, Any]], None] | None = None,
                extra_files: Mapping[str, str] | None = None,
                copy_files: Mapping[str, str] | None = None, release: bool = False) -> str:
  """Writes `config.json` and the parameters (flat or nested dict, or an iterator of
  (dotted path, array) pairs consumed lazily) as one of our checkpoints; returns its path.

  Parameters are saved in groups of about `group_bytes`; one group is written in the background
  while the next is gathered, then released. `compress` turns on Orbax's zstd (weights hardly
  compress; off, saving is about 3x faster). Refuses a non-empty `directory` unless `overwrite`;
  on error nothing is left behind. `cfg` None writes no config.json (an adapter checkpoint);
  `extra_files` (name -> text) are written beside, and `copy_files` ({name: source path}, e.g.
  the tokenizer's files) copied beside, inside the same atomic commit. `release` deletes each
  group's jax arrays once written (a streaming conversion, whose arrays are made for the save
  alone).
  """
  directory = os.path.abspath(os.fspath(directory))
  if isinstance(params, Mapping):
    params = flatten(params).items()
  ctx = ocp.v1.Context()
  ctx.array.saving.use_compression = compress
  tmp = prepare_output(directory, overwrite)
  pending = None

  def finish(p):
    response, group = p
    response.result()
    if on_saved is not None:
      on_saved(group)
    for v in group.values() if release else ():
      if isinstance(v, jax.Array):
        v.delete()

  try:
    if cfg is not None:
      cfg.replace(scan_layers=False).save(tmp)
    for name, text in (extra_files or {}).items():
      with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
        f.write(text)
    for name, source in (copy_files or {}).items():
      shutil.copyfile(source, os.path.join(tmp, name))
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
        pending = (ocp.v1.partial.save_async(target, unflatten(group)), group)
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
  """The config of one of our model checkpoints."""
  return DeepseekConfig.from_hf(os.path.join(os.fspath(directory), CONFIG_NAME))


def param_metadata(directory: str | os.PathLike) -> dict[str, jax.ShapeDtypeStruct]:
  """{path: shape and dtype} of our checkpoint's stored arrays (no array is read)."""
  meta = ocp.v1.metadata(os.path.join(os.fspath(directory), PARAMS_DIR)).metadata
  return {k: jax.ShapeDtypeStruct(tuple(v.shape), v.dtype) for k, v in flatten(meta).items()}


def read_params(directory: str | os.PathLike, targets: Mapping[str, jax.ShapeDtypeStruct]
                ) -> dict[str, jax.Array]:
  """The stored arrays named by `targets` ({path: ShapeDtypeStruct}, unrolled layout), each read
  straight into its target's sharding (only that device's slices are read) and dtype.

  Arrays stored in FP8 (`hf_to_orbax --keep_fp8`) come back as stored with their
  `<path>_scale_inv` block scales beside them (replicated); `convert.fp8.dequantize_kept` turns
  them into weights."""
  directory = os.path.abspath(os.fspath(directory))
  meta = param_metadata(directory)
  missing = sorted(set(targets) - set(meta))
  if missing:
    raise KeyError(f"{directory}: parameters {missing[:4]}{'…' if len(missing) > 4 else ''} "
                   "are missing from the checkpoint")
  abstract = {}
  for path, t in targets.items():
    stored = meta[path]
    if tuple(stored.shape) != tuple(t.shape):
      raise ValueError(f"{directory}: parameter {path!r} has shape {tuple(stored.shape)}, "
                       f"expected {tuple(t.shape)}")
    scale = meta.get(path + "_scale_inv")
    if scale is None:
      abstract[path] = t
      continue
    abstract[path] = jax.ShapeDtypeStruct(t.shape, stored.dtype, sharding=t.sharding)
    abstract[path + "_scale_inv"] = jax.ShapeDtypeStruct(
        scale.shape, scale.dtype, sharding=_replicated_like(t.sharding))
  return flatten(ocp.v1.load(os.path.join(directory, PARAMS_DIR), unflatten(abstract)))


def _replicated_like(sharding):
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  return sharding


def read_params_numpy(directory: str | os.PathLike, paths: Iterable[str]) -> dict[str, np.ndarray]:
  """Some stored arrays of our checkpoint as numpy arrays in their stored dtype (partial read)."""
  tree = unflatten({p: np.zeros(()) for p in paths})
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  with ocp.PyTreeCheckpointer() as c:
    out = c.restore(_params_item(os.fspath(directory)),
                    args=ocp.args.PyTreeRestore(item=tree, restore_args=args, partial_restore=True))
  return flatten(out)
