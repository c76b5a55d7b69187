"""A trainer workdir's checkpoints: `<workdir>/checkpoints/<step>/{state, data, meta}`.

`Checkpointer` is what the training loop saves and resumes with (an Orbax CheckpointManager over
the train state, the data position and a JSON meta record holding the model config). The readers
below take a workdir apart for loading, without building a model: its latest config, and any of
its variables straight into given shardings (each device reads only its slices). A step's own
directory (`<workdir>/checkpoints/<step>`) reads that step. They read the state item through
Orbax's item handler, not a Checkpointer: a Checkpointer looks for the step's metadata file inside
the item directory and logs a warning for each read.

The state item's tree is {"params": {<path>: {"value": array}}, "rest": {...}, "opt_state",
"step"}: NNX variables (parameters in "params", router biases in "rest") by dotted path.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from etils import epath

from deepseek_jax.config import DeepseekConfig
from deepseek_jax.params import STACKS, flatten, unflatten

CHECKPOINTS = "checkpoints"
_VALUE = ".value"


class Checkpointer:
  """Orbax CheckpointManager over {state, data position, meta}; async saves, keep K.

  `save` returns once the state is copied off the devices; the checkpoint commits (its directory
  takes its final name `<step>`) in the background. Measured by polling for that name while
  training tiny_v3 (5.5 MiB train state, a busy 2-core CPU): 0.3-0.8 s after the save began, 3-7
  of its training steps. The time grows with the state (12 bytes per parameter: float32 weights and two
  AdamW moments) over the disk's write bandwidth. A run killed before the commit resumes from the
  checkpoint before. The next `save` waits for a pending commit (at most one is in flight) and
  `close` waits for the last.
  """

  def __init__(self, directory: str, keep: int, *, create: bool = True):
    self.directory = os.path.abspath(directory)
    if not create and not os.path.isdir(self.directory):
      raise FileNotFoundError(f"{directory}: no checkpoints there")
    self.mgr = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create))
    if not create and self.mgr.latest_step() is None:
      raise FileNotFoundError(f"{directory}: no checkpoints there")

  def latest_step(self) -> int | None:
    return self.mgr.latest_step()

  def save(self, step: int, state, position: dict, cfg: DeepseekConfig,
           extra_meta: Mapping[str, Any] | None = None) -> None:
    meta = {"model_config": cfg.to_hf(), "scan_layers": cfg.scan_layers, "step": step,
            **(extra_meta or {})}
    self.mgr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(position),
        meta=ocp.args.JsonSave(meta)))

  def restore(self, state):
    """(state, data position, meta) from the latest step, shaped like `state`."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    out = self.mgr.restore(self.mgr.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    return out["state"], out["data"], out["meta"]

  def meta(self, step: int | None = None) -> dict[str, Any]:
    """A step's meta record (default: the latest step's)."""
    step = self.mgr.latest_step() if step is None else step
    return self.mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def state_dir(self, step: int | None = None) -> str:
    """A step's Orbax state item directory (default: the latest step's)."""
    return os.path.join(self.directory, str(self.mgr.latest_step() if step is None else step),
                        "state")

  def wait(self) -> None:
    self.mgr.wait_until_finished()

  def close(self) -> None:
    self.mgr.wait_until_finished()
    self.mgr.close()


def model_changes(meta: Mapping[str, Any], cfg: DeepseekConfig) -> list[str]:
  """How the model config (and the layer layout, `scan_layers`) of a run about to resume differs
  from its checkpoint's meta record, as "field: stored -> now" (empty: the state can restore)."""
  out = []
  stored, now = dict(meta.get("model_config") or {}), cfg.to_hf()
  for k in sorted(set(stored) | set(now)):
    if stored.get(k) != now.get(k):
      out.append(f"{k}: {stored.get(k)!r} -> {now.get(k)!r}")
  if meta.get("scan_layers") is not None and bool(meta["scan_layers"]) != cfg.scan_layers:
    out.append(f"scan_layers: {bool(meta['scan_layers'])} -> {cfg.scan_layers}")
  return out


def run_changes(meta: Mapping[str, Any], run: Mapping[str, Any]) -> list[str]:
  """How a run's settings differ from those its checkpoint was saved with, as
  "--flag: stored -> now". `run` is what the trainer records with each checkpoint
  ({"seq_len", "batch_size", "grad_accum", "seed", "data": the corpus and tokenizer key});
  checkpoints saved without a record compare equal."""
  out = []
  old = meta.get("run") or {}
  for k in sorted(set(old) & set(run)):
    if old[k] != run[k]:
      out.append("--data/--tokenizer: the corpus files, their sizes or times, or the tokenizer"
                 if k == "data" else f"--{k}: {old[k]!r} -> {run[k]!r}")
  return out


# ------------------------------------------------------------------------------ readers
def checkpoints_dir(path: str | os.PathLike) -> str | None:
  """The checkpoints directory of a workdir (or the checkpoints directory itself), else None."""
  path = os.path.abspath(os.fspath(path))
  for d in (os.path.join(path, CHECKPOINTS), path):
    if os.path.isdir(d) and any(n.isdigit() and os.path.isdir(os.path.join(d, n, "state"))
                                for n in os.listdir(d)):
      return d
  return None


def _locate(path: str | os.PathLike) -> tuple[str, int | None] | None:
  """(checkpoints directory, step) of a workdir or its checkpoints directory (step None: the
  latest), or of one step's directory `checkpoints/<step>` (that step); None otherwise."""
  d = checkpoints_dir(path)
  if d is not None:
    return d, None
  path = os.path.abspath(os.fspath(path))
  parent, name = os.path.split(path)
  if name.isdigit() and os.path.isdir(os.path.join(path, "state")):
    return parent, int(name)
  return None


def is_workdir(path: str | os.PathLike) -> bool:
  """A trainer workdir, its checkpoints directory, or one step's directory in it."""
  return _locate(path) is not None


def _open(path: str | os.PathLike) -> tuple[Checkpointer, int]:
  where = _locate(path)
  if where is None:
    raise FileNotFoundError(f"{path}: not a trainer workdir (no checkpoints/<step>/state)")
  ckpt = Checkpointer(where[0], 1, create=False)
  return ckpt, ckpt.latest_step() if where[1] is None else where[1]


def _stored_paths(state_dir: str) -> dict[str, str]:
  """{our dotted path: the Orbax key path} of every parameter and router bias in a state item."""
  handler = ocp.PyTreeCheckpointHandler()
  try:
    tree = handler.metadata(epath.Path(state_dir)).tree
  finally:
    handler.close()
  out = {}
  for key in flatten({k: tree[k] for k in ("params", "rest") if k in tree}):
    ours = key.split(".", 1)[1]
    out[ours[:-len(_VALUE)] if ours.endswith(_VALUE) else ours] = key
  return out


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
  """The meta record of a workdir's latest checkpoint, or of the step directory given (model
  config, layout, LoRA settings)."""
  ckpt, step = _open(path)
  try:
    return ckpt.meta(step)
  finally:
    ckpt.close()


def read_config(path: str | os.PathLike) -> DeepseekConfig:
  """The model config of a workdir's latest checkpoint (or of the step directory given), in the
  layout it was saved in (`scan_layers`)."""
  ckpt, step = _open(path)
  try:
    meta = ckpt.meta(step)
    scanned = meta.get("scan_layers")
    if scanned is None:  # saved before the meta recorded it: look at the stored names
      scanned = any(p.startswith(STACKS) for p in _stored_paths(ckpt.state_dir(step)))
    return DeepseekConfig.from_hf(meta["model_config"], scan_layers=bool(scanned))
  finally:
    ckpt.close()


def read_params(path: str | os.PathLike, targets: Mapping[str, jax.ShapeDtypeStruct]
                ) -> dict[str, jax.Array]:
  """The variables named by `targets` ({path: ShapeDtypeStruct with sharding}, in the layout the
  workdir was saved in: see `read_config`) from its latest checkpoint (or the step directory
  given), each device reading only its slices."""
  ckpt, step = _open(path)
  try:
    state_dir = ckpt.state_dir(step)
  finally:
    ckpt.close()
  stored = _stored_paths(state_dir)
  missing = sorted(set(targets) - set(stored))
  if missing:
    raise KeyError(f"{path}: variables {missing[:4]}{'…' if len(missing) > 4 else ''} are not "
                   f"in its checkpoint {state_dir} (a different model config?)")
  tree = unflatten({stored[p]: t for p, t in targets.items()})
  handler = ocp.PyTreeCheckpointHandler()
  try:
    out = handler.restore(epath.Path(state_dir), args=ocp.args.PyTreeRestore(
        item=tree, restore_args=ocp.checkpoint_utils.construct_restore_args(tree),
        partial_restore=True))
  finally:
    handler.close()
  by_key = flatten(out)
  return {p: by_key[stored[p]] for p in targets}


def clear_demo_workdir(workdir: str, entries: frozenset[str], what: str) -> None:
  """Empties an earlier `what` run's workdir (holding only `entries`, what such a run writes);
  refuses (ValueError) one holding anything else."""
  if not os.path.exists(workdir):
    return
  if not os.path.isdir(workdir):
    raise ValueError(f"--workdir={workdir}: exists and is not a directory")
  foreign = sorted(set(os.listdir(workdir)) - entries)
  if foreign:
    raise ValueError(f"--workdir={workdir} holds {len(foreign)} entries a {what} run does not "
                     f"write (first: {foreign[0]!r}); the demo empties its workdir, so give it a "
                     f"new or empty directory, or an earlier {what}'s")
  shutil.rmtree(workdir)
