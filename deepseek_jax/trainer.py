"""The training loop: DeepSeek-V3's recipe (MTP, auxiliary-loss-free balancing) with exact resume.

`train(TrainConfig(...))` is what `python -m deepseek_jax.train` and notebooks call. One step:
  loss = CE + λ·MTP + α·Σ_layers seq_balance (+ α_V2·Σ_layers expert_balance when asked),
         the MTP blocks' balance terms weighted by λ too;
  gradients summed over `grad_accum` micro-batches (mean), clipped, AdamW;
  then, outside the gradient, every noaux_tc router bias moves by γ·sign(mean load − load).
The train state (parameters, optimizer state, router biases, step) and the data position are
saved with Orbax every `save_every` steps; a rerun in the same workdir resumes from the latest
checkpoint and, on CPU, reproduces the uninterrupted run bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from deepseek_jax import data as data_lib
from deepseek_jax import losses, metrics as metrics_lib, optim
from deepseek_jax.config import DeepseekConfig
from deepseek_jax.tokenizer import load_tokenizer


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a run needs; the absl flags of `deepseek_jax.train` map one to one onto fields."""

  # model
  preset: str | None = None            # a name from deepseek_jax.presets (or use config_json)
  config_json: str | None = None       # a Hugging Face style config.json (file or directory)
  init_from: str | None = None         # safetensors dir (released layout) or a trainer workdir
  moe_dispatch: str | None = None      # override cfg.moe_dispatch (auto | dense | ragged | pallas)
  scan_layers: bool | None = None      # override cfg.scan_layers
  remat: bool = False                  # recompute each layer's activations in the backward pass
  compute_dtype: str = "float32"       # float32 | bfloat16; parameters stay float32
  # data
  data: str = ""                       # files / directories (comma-separated), searched recursively
  data_patterns: tuple[str, ...] = data_lib.DEFAULT_PATTERNS  # file name patterns in directories
  data_exclude: tuple[str, ...] = data_lib.DEFAULT_EXCLUDE    # directory names never entered
  max_data_bytes: int | None = None    # cap on the corpus size (files taken in sorted order)
  tokenizer: str = "byte"              # 'byte', a tokenizer.json, or a directory holding one
  seq_len: int = 256                   # tokens per training sequence
  batch_size: int = 8                  # sequences per optimizer step (all micro-batches together)
  grad_accum: int = 1                  # micro-batches per step (batch_size must divide evenly)
  # optimization
  steps: int = 1000                    # train until this step (a rerun with more steps resumes)
  decay_steps: int | None = None       # length of the cosine schedule (default: steps)
  learning_rate: float = 1e-3          # peak learning rate
  warmup_steps: int = 100              # linear warmup steps
  min_lr_ratio: float = 0.1            # final learning rate / peak
  weight_decay: float = 0.1            # AdamW decoupled decay (matrices only)
  clip_norm: float = 1.0               # global gradient-norm clip (<= 0: off)
  mtp_weight: float = 0.3              # λ, weight of the MTP loss (DeepSeek-V3: 0.3, later 0.1)
  bias_update_speed: float = 0.001     # γ of auxiliary-loss-free balancing (0: off)
  seq_aux_alpha: float = 1e-4          # α of V3's complementary sequence-wise balance loss
  expert_aux_alpha: float | None = None  # α of V2's expert-level loss; None: cfg.aux_loss_alpha
  #                                      unless the router is noaux_tc (then off)
  seed: int = 0                        # parameter init and data order
  # mesh (passed to the sharding package when present; else data parallel over all devices)
  data_parallel: int = -1              # -1: whatever the other axes leave
  fsdp: int = 1
  expert: int = 1
  tensor: int = 1
  # output
  workdir: str = ""                    # checkpoints, metrics.jsonl, tensorboard/, data cache
  save_every: int = 500                # checkpoint period in steps (and always at the end)
  keep: int = 3                        # checkpoints kept
  log_every: int = 10                  # metrics period in steps
  peak_flops: float | None = None      # per-device peak for MFU (default: data sheet or measured)
  progress: bool | None = None         # progress bar (default: when stderr is a terminal)
  tensorboard: bool = True             # also write TensorBoard event files

  def optim_config(self) -> optim.OptimConfig:
    return optim.OptimConfig(
        learning_rate=self.learning_rate, warmup_steps=self.warmup_steps,
        total_steps=self.decay_steps or self.steps, min_lr_ratio=self.min_lr_ratio,
        weight_decay=self.weight_decay, clip_norm=self.clip_norm)

  def to_json(self) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(tc: TrainConfig):
  if tc.compute_dtype not in DTYPES:
    raise ValueError(f"--compute_dtype={tc.compute_dtype!r}: expected one of {sorted(DTYPES)}")
  return DTYPES[tc.compute_dtype]


def expert_alpha(tc: TrainConfig, cfg: DeepseekConfig) -> float:
  """V2's expert-level balance weight: the flag, else the config's unless routing is noaux_tc."""
  if tc.expert_aux_alpha is not None:
    return float(tc.expert_aux_alpha)
  return 0.0 if cfg.topk_method == "noaux_tc" else float(cfg.aux_loss_alpha)


# ------------------------------------------------------------------------------------ the step


def make_loss_fn(graphdef, cfg: DeepseekConfig, tc: TrainConfig) -> Callable:
  """loss(params, rest, tokens [b, T+1]) -> (total, aux dict) for one micro-batch."""
  alpha_v2 = expert_alpha(tc, cfg)
  n_main = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))  # routers before MTP's

  def loss_fn(params, rest, tokens):
    model = nnx.merge(graphdef, params, rest)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]                      # [b, T]
    out = model.forward(inputs, with_mtp=True)
    ce, _ = losses.cross_entropy(out.logits, targets)
    mtp, per_depth = losses.mtp_loss(out.mtp_logits, targets)
    aux = jnp.zeros((), jnp.float32)
    for i, r in enumerate(out.router):
      # An MTP block's balance terms belong to the MTP objective: weighted by λ as well, so that
      # λ = 0 leaves the main model exactly as without MTP layers.
      w = 1.0 if i < n_main else tc.mtp_weight
      if tc.seq_aux_alpha and w:
        aux += w * tc.seq_aux_alpha * losses.balance_loss(
            r.scores, r.topk_idx, per_sequence=True, normalize_scores=True)
      if alpha_v2 and w:
        aux += w * alpha_v2 * losses.balance_loss(
            r.scores, r.topk_idx, per_sequence=cfg.seq_aux, normalize_scores=False)
    total = ce + tc.mtp_weight * mtp + aux
    e = cfg.n_routed_experts or 1
    counts = (jnp.stack([losses.expert_counts(r.topk_idx, e) for r in out.router])
              if out.router else jnp.zeros((0, e), jnp.float32))         # [R, E]
    logs = {"loss": ce, "mtp_loss": mtp, "aux_loss": aux, "total_loss": total,
            "mtp_loss_depths": jnp.stack(per_depth) if per_depth else jnp.zeros((0,))}
    return total, (logs, counts)

  return loss_fn


def update_router_biases(rest, counts: jax.Array, speed: float):
  """Applies `losses.bias_update` to every router bias in `rest`, in router order (main MoE
  layers, stacked or not, then the MTP blocks); counts [R, E]."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(rest)
  is_bias = ["e_score_correction_bias" in jax.tree_util.keystr(p) for p, _ in leaves]
  total = sum(int(np.prod(l.shape[:-1])) for (_, l), b in zip(leaves, is_bias) if b)
  if total != counts.shape[0]:
    raise ValueError(f"router bias update: {total} biases for {counts.shape[0]} routers")
  out, r = [], 0
  for (_, leaf), bias in zip(leaves, is_bias):
    if not bias:
      out.append(leaf)
      continue
    n = int(np.prod(leaf.shape[:-1]))                                    # stacked layers
    out.append(losses.bias_update(leaf, counts[r:r + n].reshape(leaf.shape), speed))
    r += n
  return jax.tree_util.tree_unflatten(treedef, out)


def make_train_step(graphdef, tx: optax.GradientTransformation, cfg: DeepseekConfig,
                    tc: TrainConfig) -> Callable:
  """step(state, tokens [A, b, T+1]) -> (state, metrics); A micro-batches (gradient accumulation).

  state = {"params", "rest" (router biases), "opt_state", "step"}. Not jitted here.
  """
  # Differentiated with respect to the router biases too (their gradient is zero: they only steer
  # the discrete top-k choice, and it is discarded): nnx.scan refuses Variables that come from an
  # outer trace level, which a non-differentiated `rest` would be under a scanned model.
  vg = jax.value_and_grad(make_loss_fn(graphdef, cfg, tc), argnums=(0, 1), has_aux=True)

  def grad_fn(params, rest, toks):
    value, (grads, _) = vg(params, rest, toks)
    return value, grads

  schedule = optim.schedule(tc.optim_config())
  has_bias = cfg.is_moe and cfg.topk_method == "noaux_tc"

  def step(state, tokens):
    params, rest = state["params"], state["rest"]
    n_micro = tokens.shape[0]

    def micro(carry, toks):
      (_, (logs, counts)), grads = grad_fn(params, rest, toks)
      acc = jax.tree.map(jnp.add, carry, (grads, logs, counts))
      return acc, None

    zero = jax.eval_shape(lambda: grad_fn(params, rest, tokens[0]))
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (zero[1], zero[0][1][0],
                                                                zero[0][1][1]))
    if n_micro == 1:
      (grads, logs, counts), _ = micro(zero, tokens[0])
    else:
      (grads, logs, counts), _ = jax.lax.scan(micro, zero, tokens)
      grads = jax.tree.map(lambda g: g / n_micro, grads)
      logs = jax.tree.map(lambda v: v / n_micro, logs)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    params = optax.apply_updates(params, updates)
    if has_bias and tc.bias_update_speed:
      rest = update_router_biases(rest, counts, tc.bias_update_speed)
    mean = jnp.maximum(jnp.mean(counts, axis=-1), 1e-20)                 # [R]
    logs = dict(logs, grad_norm=grad_norm, lr=schedule(state["step"]),
                load_min=jnp.min(counts, -1) / mean, load_max=jnp.max(counts, -1) / mean,
                load_cv=jnp.std(counts, -1) / mean)
    new = {"params": params, "rest": rest, "opt_state": opt_state, "step": state["step"] + 1}
    return new, logs

  return step


# ------------------------------------------------------------------------------------ setup


def model_config(tc: TrainConfig) -> DeepseekConfig:
  """From --config_json, --preset, or the --init_from checkpoint; then the runtime overrides."""
  from deepseek_jax.presets import get_preset
  if tc.config_json and tc.preset:
    raise ValueError("--preset and --config_json both given: pass one")
  if tc.config_json:
    cfg = DeepseekConfig.from_hf(tc.config_json)
  elif tc.preset:
    cfg = get_preset(tc.preset)
  elif tc.init_from and os.path.isfile(os.path.join(tc.init_from, "config.json")):
    cfg = DeepseekConfig.from_hf(tc.init_from)
  elif tc.init_from:
    cfg = Checkpointer(_checkpoint_dir(tc.init_from), 1, create=False).saved_config()
  else:
    raise ValueError("no model: pass --preset, --config_json or --init_from")
  over = {k: v for k, v in (("moe_dispatch", tc.moe_dispatch), ("scan_layers", tc.scan_layers))
          if v is not None}
  return cfg.replace(**over) if over else cfg


def check_inputs(tc: TrainConfig, cfg: DeepseekConfig, n_batch_shards: int) -> None:
  """Clear errors for flags that cannot work together."""
  for name in ("steps", "batch_size", "grad_accum", "save_every", "keep", "log_every", "seq_len"):
    if getattr(tc, name) < 1:
      raise ValueError(f"--{name}={getattr(tc, name)}: must be >= 1")
  if tc.seq_len > cfg.max_position_embeddings:
    raise ValueError(f"--seq_len={tc.seq_len} is above the model's max_position_embeddings="
                     f"{cfg.max_position_embeddings}")
  if tc.batch_size % tc.grad_accum:
    raise ValueError(f"--batch_size={tc.batch_size} is not divisible by --grad_accum="
                     f"{tc.grad_accum}")
  micro = tc.batch_size // tc.grad_accum
  if micro % n_batch_shards:
    raise ValueError(f"--batch_size={tc.batch_size} (micro-batch {micro} with --grad_accum="
                     f"{tc.grad_accum}) is not divisible by the data-parallel size "
                     f"{n_batch_shards} (data_parallel x fsdp)")


def make_mesh(tc: TrainConfig) -> jax.sharding.Mesh:
  """The device mesh (data, fsdp, expert, tensor) of the --data_parallel/--fsdp/--expert/--tensor
  flags; -1 takes what the other axes leave."""
  import sharding
  return sharding.make_mesh(data=tc.data_parallel, fsdp=tc.fsdp, expert=tc.expert,
                            tensor=tc.tensor)


def batch_sharding(mesh) -> jax.sharding.NamedSharding:
  """Token batches [A, b, T+1] split over the data-parallel axes along b."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp")))


def state_shardings(mesh, state):
  """Each leaf's own sharding where it already lies on `mesh` (parameters placed by the rules,
  optimizer moments that followed them), replicated otherwise (the step counter)."""
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def keep(x):
    s = getattr(x, "sharding", None)
    return s if isinstance(s, jax.sharding.NamedSharding) and s.mesh == mesh else rep
  return jax.tree.map(keep, state)


def _bytes_per_device(tree) -> tuple[int, int]:
  """(largest bytes any one device holds, total bytes) of a tree of arrays."""
  per_device: dict[Any, int] = {}
  total = 0
  for x in jax.tree.leaves(tree):
    total += x.size * x.dtype.itemsize
    for shard in x.addressable_shards:
      per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
  return max(per_device.values(), default=0), total


def _checkpoint_dir(path: str) -> str:
  path = os.path.abspath(path)
  sub = os.path.join(path, "checkpoints")
  return sub if os.path.isdir(sub) else path


def build_model(tc: TrainConfig, cfg: DeepseekConfig, dtype, echo, mesh):
  """A fresh model (float32 parameters, `dtype` compute), or one loaded from --init_from, with
  every parameter placed on `mesh` by the sharding rules (created or read in its shards)."""
  import sharding
  if not tc.init_from:
    return sharding.create_sharded(cfg, mesh, rngs_seed=tc.seed, dtype=dtype,
                                   param_dtype=jnp.float32)
  path = tc.init_from
  if not os.path.exists(path):
    raise FileNotFoundError(f"--init_from={path}: no such file or directory")
  from deepseek_jax import checkpoint
  if os.path.isdir(os.path.join(path, checkpoint.PARAMS_DIR)) or os.path.isfile(
      os.path.join(path, "config.json")):
    from deepseek_jax.pretrained import from_pretrained
    echo(f"loading weights from {path}")
    over = {k: v for k, v in (("moe_dispatch", tc.moe_dispatch), ("scan_layers", tc.scan_layers))
            if v is not None}
    return from_pretrained(path, dtype=dtype, param_dtype=jnp.float32, mesh=mesh, **over)
  echo(f"loading parameters from the trainer checkpoint in {path}")
  return sharding.shard_model(load_model(path, cfg, dtype=dtype), mesh)


def load_model(workdir: str, cfg: DeepseekConfig | None = None, *, dtype=jnp.float32):
  """The model of a trainer workdir's latest checkpoint (float32 parameters, `dtype` compute).

  `cfg` defaults to the saved config; a given one must describe the same parameter shapes.
  """
  from deepseek_jax.model import DeepseekForCausalLM
  ckpt = Checkpointer(_checkpoint_dir(workdir), 1, create=False)
  cfg = cfg or ckpt.saved_config()
  model = nnx.eval_shape(lambda: DeepseekForCausalLM(cfg, dtype=dtype, param_dtype=jnp.float32,
                                                     rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params, rest = ckpt.restore_model(params, rest)
  ckpt.close()
  return nnx.merge(graphdef, params, rest)


class Checkpointer:
  """Orbax CheckpointManager over {state, data position, meta}; async saves, keep K."""

  def __init__(self, directory: str, keep: int, *, create: bool = True):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.directory = os.path.abspath(directory)
    if not create and not os.path.isdir(self.directory):
      raise FileNotFoundError(f"{directory}: no checkpoints there")
    self.mgr = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create))
    if not create and self.mgr.latest_step() is None:
      raise FileNotFoundError(f"{directory}: no checkpoints there")

  def latest_step(self) -> int | None:
    return self.mgr.latest_step()

  def save(self, step: int, state, position: dict, cfg: DeepseekConfig) -> None:
    ocp = self._ocp
    self.mgr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(position),
        meta=ocp.args.JsonSave({"model_config": cfg.to_hf(), "step": step})))

  def restore(self, state):
    """(state, data position, saved model config) from the latest step, shaped like `state`."""
    ocp = self._ocp
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    out = self.mgr.restore(self.mgr.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    return out["state"], out["data"], out["meta"]["model_config"]

  def saved_config(self) -> DeepseekConfig:
    ocp = self._ocp
    meta = self.mgr.restore(self.mgr.latest_step(),
                            args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    return DeepseekConfig.from_hf(meta["model_config"])

  def restore_model(self, params, rest):
    """Parameters and router biases only (for --init_from), shaped like the given abstract states."""
    ocp = self._ocp
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def struct(x):  # onto one device; the trainer places the state on its mesh afterwards
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one)

    target = {"params": jax.tree.map(struct, params), "rest": jax.tree.map(struct, rest)}
    out = self.mgr.restore(self.mgr.latest_step(), args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)))["state"]
    return out["params"], out["rest"]

  def wait(self) -> None:
    self.mgr.wait_until_finished()

  def close(self) -> None:
    self.mgr.wait_until_finished()
    self.mgr.close()


# ------------------------------------------------------------------------------------ the run


def _echo(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def _router_names(cfg: DeepseekConfig) -> list[str]:
  names = [f"layer{i}" for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
  if cfg.is_moe_layer(cfg.num_hidden_layers):
    names += [f"mtp{k}" for k in range(cfg.num_nextn_predict_layers)]
  return names


def _host_metrics(logs: dict, cfg: DeepseekConfig) -> dict[str, Any]:
  """Flat JSON-able record from the step's metric arrays."""
  rec: dict[str, Any] = {}
  for k in ("loss", "mtp_loss", "aux_loss", "total_loss", "grad_norm", "lr"):
    rec[k] = float(logs[k])
  for d, v in enumerate(np.asarray(logs["mtp_loss_depths"]), start=1):
    rec[f"mtp_loss_{d}"] = float(v)
  for stat in ("load_min", "load_max", "load_cv"):
    for name, v in zip(_router_names(cfg), np.asarray(logs[stat])):
      rec[f"{stat}/{name}"] = float(v)
  cvs = np.asarray(logs["load_cv"])
  if cvs.size:
    rec["load_cv_mean"] = float(np.mean(cvs))
  return rec


def train(tc: TrainConfig, *, echo: Callable[[str], None] = _echo) -> dict[str, Any]:
  """Trains (or resumes) as `tc` says; returns the last logged metrics."""
  if not tc.workdir:
    raise ValueError("--workdir is required (checkpoints and metrics.jsonl go there)")
  workdir = os.path.abspath(tc.workdir)
  os.makedirs(workdir, exist_ok=True)
  cfg = model_config(tc)
  dtype = compute_dtype(tc)
  mesh = make_mesh(tc)
  n_batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  check_inputs(tc, cfg, n_batch_shards)
  tokenizer = load_tokenizer(tc.tokenizer)
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(f"--tokenizer={tc.tokenizer}: vocab_size {tokenizer.vocab_size} exceeds the "
                     f"model's vocab_size {cfg.vocab_size}")
  dataset = data_lib.make_dataset(tc.data, tokenizer, tc.seq_len, os.path.join(workdir, "data"),
                                  patterns=tc.data_patterns, exclude=tc.data_exclude,
                                  max_bytes=tc.max_data_bytes, log=echo)
  it = data_lib.DataIterator(dataset, tc.batch_size, tc.seed)

  tx = optim.make_optimizer(tc.optim_config())
  with jax.set_mesh(mesh):
    model = build_model(tc, cfg, dtype, echo, mesh)
    cfg = model.cfg
    model.remat = tc.remat
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    del model
    state = {"params": params, "rest": rest, "opt_state": jax.jit(tx.init)(params),
             "step": jnp.zeros((), jnp.int32)}  # the moments follow the parameters' shardings
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), tc.keep)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    start = 0
    if ckpt.latest_step() is not None:
      state, position, saved_cfg = ckpt.restore(state)
      if saved_cfg != cfg.to_hf():
        raise ValueError(f"{workdir}: its checkpoint holds a different model config; use a new "
                         "--workdir or the same --preset/--config_json")
      it.restore(position)
      start = int(state["step"])
      metrics_lib.truncate_jsonl(metrics_path, start)
      echo(f"resumed from step {start} ({ckpt.directory})")
    if start >= tc.steps:
      echo(f"nothing to do: checkpoint at step {start} >= --steps={tc.steps}")
      ckpt.close()
      last = metrics_lib.read_jsonl(metrics_path)
      return last[-1] if last else {"step": start}

    batch_spec = batch_sharding(mesh)
    state_sh = state_shardings(mesh, state)
    state = jax.device_put(state, state_sh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    step_fn = jax.jit(make_train_step(graphdef, tx, cfg, tc), donate_argnums=(0,),
                      out_shardings=(state_sh, replicated))
    peak, peak_src = metrics_lib.peak_flops_per_device(tc.peak_flops)
    flops_tok = cfg.flops_per_token(tc.seq_len, training=True)
    n_dev = mesh.devices.size
    writer = metrics_lib.JsonlWriter(metrics_path)
    tb = (metrics_lib.EventFileWriter(os.path.join(workdir, "tensorboard"))
          if tc.tensorboard else None)
    bar = metrics_lib.ProgressBar(tc.steps, start, tc.progress)
    echo(f"training {cfg.num_params(include_mtp=True):,} parameters from step {start} to "
         f"{tc.steps}: batch {tc.batch_size} x {tc.seq_len} tokens, {n_dev} device(s), "
         f"MFU peak {peak:.3g} FLOP/s per device ({peak_src})")
    per_dev, total = _bytes_per_device(state)
    echo(f"mesh {dict(mesh.shape)}: train state {total / 2**20:.2f} MiB, at most "
         f"{per_dev / 2**20:.2f} MiB per device")

    tokens_per_step = tc.batch_size * tc.seq_len
    last: dict[str, Any] = {}
    pending = None  # (step, logs) of the last dispatched step, read after the next dispatch
    t_last, steps_since = time.perf_counter(), 0

    def read(step_no, logs):
      nonlocal t_last, steps_since, last
      rec = _host_metrics(jax.device_get(logs), cfg)
      if not (math.isfinite(rec["total_loss"]) and math.isfinite(rec["grad_norm"])):
        bar.clear()
        ckpt.wait()
        good = ckpt.latest_step()
        raise FloatingPointError(
            f"loss is {rec['total_loss']} (grad norm {rec['grad_norm']}) at step {step_no}: "
            f"stopping; the last good checkpoint is step {good} in {ckpt.directory}")
      now = time.perf_counter()
      tps = tokens_per_step * steps_since / max(now - t_last, 1e-9)
      t_last, steps_since = now, 0
      rec = {"step": step_no, **rec, "tokens_per_s": tps,
             "mfu": tps * flops_tok / (peak * n_dev), "time": time.time()}
      writer.write(rec)
      if tb:
        tb.scalars(step_no, rec)
      bar.update(step_no, rec["loss"], tps)
      last = rec

    try:
      for step_no in range(start + 1, tc.steps + 1):
        batch = next(it).reshape(tc.grad_accum, tc.batch_size // tc.grad_accum, tc.seq_len + 1)
        position = it.state()
        # each process transfers only the rows its own devices hold (multi-host: its share)
        batch = jax.make_array_from_callback(batch.shape, batch_spec, lambda i, b=batch: b[i])
        state, logs = step_fn(state, batch)
        steps_since += 1
        if pending is not None:
          read(*pending)
          pending = None
        want_log = step_no % tc.log_every == 0 or step_no == tc.steps or step_no == start + 1
        if step_no % tc.save_every == 0 or step_no == tc.steps:
          if want_log:
            read(step_no, logs)  # checks the loss before the state is saved
          else:
            rec = jax.device_get(logs)
            if not (np.isfinite(rec["total_loss"]) and np.isfinite(rec["grad_norm"])):
              read(step_no, logs)  # raises with the message
          ckpt.save(step_no, state, position, cfg)
        elif want_log:
          pending = (step_no, logs)
      if pending is not None:
        read(*pending)
    finally:
      bar.clear()
      ckpt.close()
      writer.close()
      if tb:
        tb.close()
  echo(f"step {last.get('step')}: loss {last.get('loss', float('nan')):.4f}")
  return last
