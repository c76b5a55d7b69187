"""The training loop: DeepSeek-V3's recipe (MTP, auxiliary-loss-free balancing) with exact resume.

`train(TrainConfig(...))` is what `python -m deepseek_jax.train` and notebooks call. Each step is
`train_step.make_train_step` (loss, gradients, AdamW, router-bias update), jitted over the mesh.
The train state (parameters, optimizer state, router biases, step) and the data position are
saved with Orbax (`workdir.Checkpointer`) every `save_every` steps; a rerun in the same workdir
resumes from the latest checkpoint and, on CPU, reproduces the uninterrupted run bit for bit.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax import adapters, optim, sharding, train_data
from deepseek_jax import data as data_lib
from deepseek_jax import metrics as metrics_lib
from deepseek_jax.config import DeepseekConfig
from deepseek_jax.convert.atomic import check_apart
from deepseek_jax.dtypes import from_name
from deepseek_jax.layers import LoRAParam
from deepseek_jax.presets import get_preset
from deepseek_jax.pretrained import from_pretrained, read_model_config
from deepseek_jax.tokenizer import save_tokenizer
from deepseek_jax.train_config import TrainConfig
from deepseek_jax.train_step import make_eval_step, make_train_step
from deepseek_jax.workdir import Checkpointer, model_changes, run_changes


# ------------------------------------------------------------------------------------ setup


def runtime_overrides(tc: TrainConfig) -> dict[str, Any]:
  """The config's runtime fields the flags set (None: the config's own)."""
  over = {k: v for k, v in (("moe_dispatch", tc.moe_dispatch), ("scan_layers", tc.scan_layers))
          if v is not None}
  return {**over, "remat": tc.remat}


def model_config(tc: TrainConfig) -> DeepseekConfig:
  """From --config_json, --preset, or the --init_from checkpoint; then the runtime overrides."""
  if tc.config_json and tc.preset:
    raise ValueError("--preset and --config_json both given: pass one")
  if tc.init_from and not os.path.isdir(tc.init_from):
    raise FileNotFoundError(f"--init_from={tc.init_from}: no such directory")
  if tc.config_json:
    cfg = DeepseekConfig.from_hf(tc.config_json)
  elif tc.preset:
    cfg = get_preset(tc.preset)
  elif tc.init_from:
    cfg = read_model_config(tc.init_from)
  else:
    raise ValueError("no model: pass --preset, --config_json or --init_from")
  return cfg.replace(**runtime_overrides(tc))


def check_inputs(tc: TrainConfig, cfg: DeepseekConfig, n_batch_shards: int) -> None:
  """Clear errors for flags that cannot work together."""
  for name in ("steps", "batch_size", "grad_accum", "save_every", "keep", "log_every", "seq_len",
               "eval_every"):
    if getattr(tc, name) < 1:
      raise ValueError(f"--{name}={getattr(tc, name)}: must be >= 1")
  if tc.lora_rank < 0:
    raise ValueError(f"--lora_rank={tc.lora_rank}: must be >= 0 (0: no adapters)")
  if tc.base_dtype in ("int8", "fp8") and not tc.lora_rank:
    raise ValueError(f"--base_dtype={tc.base_dtype} stores a frozen base: it needs "
                     "--lora_rank > 0 (full fine-tuning trains float32 or bfloat16 weights)")
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


def build_model(tc: TrainConfig, cfg: DeepseekConfig, dtype, echo, mesh):
  """A fresh model (`dtype` compute) created in its shards, or the --init_from model read into
  them (`from_pretrained`: any of its layouts); with --lora_rank, fresh adapters on top and the
  base stored as --base_dtype says."""
  quantized = tc.base_dtype in ("int8", "fp8")
  param_dtype = jnp.bfloat16 if tc.base_dtype != "float32" else jnp.float32
  if not tc.init_from:
    if quantized:
      raise ValueError(f"--base_dtype={tc.base_dtype} quantizes a pretrained base: pass "
                       "--init_from")
    model = sharding.create_sharded(cfg, mesh, rngs_seed=tc.seed, dtype=dtype,
                                    param_dtype=param_dtype)
  else:
    echo(f"loading weights from {tc.init_from}")
    model = from_pretrained(tc.init_from, dtype=dtype, param_dtype=param_dtype, mesh=mesh,
                            weight_quant=tc.base_dtype if quantized else "none",
                            **runtime_overrides(tc))
  if tc.lora_rank:
    model = adapters.with_adapters(model, rank=tc.lora_rank, alpha=tc.lora_alpha,
                                   targets=tc.lora_targets, seed=tc.seed, mesh=mesh)
  return model


def run_meta(tc: TrainConfig, cfg: DeepseekConfig) -> dict[str, Any]:
  """What a checkpoint records beside the model config: enough for `from_pretrained` to rebuild
  a LoRA run's model (its base and adapter settings), and the run's flags."""
  lora = adapters.lora_fields(tc.lora_rank, tc.lora_alpha, tc.lora_targets) if tc.lora_rank \
      else None
  return {"lora": {**lora, "lora_targets": list(tc.lora_targets)} if lora else None,
          "init_from": os.path.abspath(tc.init_from) if tc.init_from else None,
          "weight_quant": cfg.weight_quant, "train_config": tc.to_json()}


def split_state(model, tx, tc: TrainConfig):
  """(graphdef, train state): what is trained ("params": every Param, or the LoRA adapters), the
  frozen base ("frozen", empty without LoRA), the rest (router biases), optimizer state, step."""
  trainable = LoRAParam if tc.lora_rank else nnx.Param
  graphdef, params, frozen, rest = nnx.split(model, trainable, nnx.Param, ...)
  state = {"params": params, "frozen": frozen, "rest": rest,
           "opt_state": jax.jit(tx.init)(params),  # the moments follow the parameters' shardings
           "step": jnp.zeros((), jnp.int32)}
  return graphdef, state


def saved(state) -> dict[str, Any]:
  """The part of the train state a checkpoint holds: all but the frozen base (rebuilt from
  --init_from on resume)."""
  return {k: v for k, v in state.items() if k != "frozen"}


def to_devices(batch, spec):
  """Each process transfers only the rows its own devices hold (multi-host: its share)."""
  return jax.tree.map(lambda b: jax.make_array_from_callback(b.shape, spec, lambda i: b[i]),
                      batch)


def evaluate(eval_fn, state, dataset, tc: TrainConfig, spec) -> float:
  """Mean next-token loss over the held-out set's targets."""
  total = count = 0.0
  for batch in train_data.eval_batches(dataset, tc.batch_size // tc.grad_accum):
    s, n = jax.device_get(eval_fn(state, to_devices(batch, spec)))
    total, count = total + float(s), count + float(n)
  return total / max(count, 1.0)


# ------------------------------------------------------------------------------------ the run


def _echo(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
  """12s, 3m05s, 1h02m."""
  s = int(round(seconds))
  if s < 60:
    return f"{s}s"
  if s < 3600:
    return f"{s // 60}m{s % 60:02d}s"
  return f"{s // 3600}h{s % 3600 // 60:02d}m"


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


def close_run(bar, ckpt: Checkpointer, writer: metrics_lib.JsonlWriter, tb) -> None:
  """Closes a run's progress bar, checkpointer, metrics.jsonl writer and TensorBoard writer
  (None when off), in that order."""
  bar.close()
  ckpt.close()
  writer.close()
  if tb:
    tb.close()


def train(tc: TrainConfig, *, echo: Callable[[str], None] = _echo) -> dict[str, Any]:
  """Trains (or resumes) as `tc` says; returns the last logged metrics."""
  if not tc.workdir:
    raise ValueError("--workdir is required (checkpoints and metrics.jsonl go there)")
  workdir = os.path.abspath(tc.workdir)
  check_apart(workdir, {"--init_from": tc.init_from}, output_name="--workdir")
  os.makedirs(workdir, exist_ok=True)
  cfg = model_config(tc)
  dtype = from_name(tc.compute_dtype, "--compute_dtype")
  mesh = make_mesh(tc)
  n_batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  check_inputs(tc, cfg, n_batch_shards)
  tokenizer = train_data.make_tokenizer(tc, cfg.vocab_size)
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(f"--tokenizer={tc.tokenizer}: vocab_size {tokenizer.vocab_size} exceeds the "
                     f"model's vocab_size {cfg.vocab_size}")
  save_tokenizer(tokenizer, workdir)  # generation and the converters find it there
  dataset = train_data.make_dataset(tc, tokenizer, workdir, log=echo)
  eval_set = (train_data.make_dataset(tc, tokenizer, workdir, path=tc.eval_data, log=echo)
              if tc.eval_data else None)
  it = data_lib.DataIterator(dataset, tc.batch_size, tc.seed)
  # A resumed run is compared with its checkpoint before anything is built or restored.
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), tc.keep)
  meta = ckpt.meta() if ckpt.latest_step() is not None else None
  run = {"seq_len": tc.seq_len, "batch_size": tc.batch_size, "grad_accum": tc.grad_accum,
         "seed": tc.seed, "data": dataset.key}
  run_diff = run_changes(meta, run) if meta is not None else []
  if run_diff and not tc.allow_resume_changes:
    ckpt.close()
    raise ValueError(f"{workdir}: resuming with other settings than its checkpoint's run ("
                     f"{'; '.join(run_diff)}); pass --allow_resume_changes to continue with "
                     "them, or use a new --workdir")

  tx = optim.make_optimizer(tc.optim_config())
  with jax.set_mesh(mesh):
    model = build_model(tc, cfg, dtype, echo, mesh)
    cfg = model.cfg
    graphdef, state = split_state(model, tx, tc)
    del model
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    start = 0
    if meta is not None:
      # compared before restoring: a restore into another model's state fails deep in Orbax
      model_diff = model_changes(meta, cfg)
      if model_diff:
        ckpt.close()
        raise ValueError(f"{workdir}: its checkpoint holds another model config ("
                         f"{'; '.join(model_diff[:5])}{'; ...' if len(model_diff) > 5 else ''}); "
                         "use a new --workdir or the same --preset/--config_json")
      restored, position, _ = ckpt.restore(saved(state))
      state = dict(restored, frozen=state["frozen"])
      if run_diff:
        echo(f"resuming with changed settings: {'; '.join(run_diff)}")
        if any(d.startswith(("--data", "--seq_len")) for d in run_diff):
          position = {"epoch": 0, "index": 0}  # positions of the old sequences mean nothing now
          echo("the data order starts afresh")
      it.restore(position)
      start = int(state["step"])
      echo(f"resumed from step {start} ({ckpt.directory})")
    # the records after the checkpoint resumed from (all of them when a run was killed before its
    # first checkpoint committed) are written again
    metrics_lib.truncate_jsonl(metrics_path, start)
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
    eval_fn = jax.jit(make_eval_step(graphdef, cfg, tc))
    eval_spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    peak, peak_src = metrics_lib.peak_flops_per_device(tc.peak_flops)
    flops_tok = cfg.flops_per_token(tc.seq_len, training=True)
    n_dev = mesh.devices.size
    writer = metrics_lib.JsonlWriter(metrics_path)
    tb = (metrics_lib.EventFileWriter(os.path.join(workdir, "tensorboard"))
          if tc.tensorboard else None)
    # smoothing=0: the ETA is the mean pace since the bar's clock restarted after the first step
    # (which includes compiling)
    bar = metrics_lib.progress_bar(tc.steps, initial=start, enabled=tc.progress, unit="step",
                                   smoothing=0)
    lines = tc.progress is None and not sys.stderr.isatty()  # no bar: a line per logged step
    echo(f"training {cfg.num_params(include_mtp=True):,} parameters from step {start} to "
         f"{tc.steps}: batch {tc.batch_size} x {tc.seq_len} tokens, {n_dev} device(s), "
         f"MFU peak {peak:.3g} FLOP/s per device ({peak_src})")
    per_dev, total = _bytes_per_device(state)
    echo(f"mesh {dict(mesh.shape)}: train state {total / 2**20:.2f} MiB, at most "
         f"{per_dev / 2**20:.2f} MiB per device")
    if tc.lora_rank:
      n_train = sum(x.size for x in jax.tree.leaves(state["params"]))
      echo(f"LoRA rank {tc.lora_rank} on {', '.join(tc.lora_targets)}: {n_train:,} trained "
           f"parameters; the base is frozen in {tc.base_dtype}")

    tokens_per_step = tc.batch_size * tc.seq_len
    last: dict[str, Any] = {}
    pending = None  # (step, logs) of the last dispatched step, read after the next dispatch
    t_last, steps_since = time.perf_counter(), 0
    first: tuple[int, float] | None = None  # (step, time) of the first step read: compiled by then

    def read(step_no, logs, extra=None):
      nonlocal t_last, steps_since, last, first
      rec = _host_metrics(jax.device_get(logs), cfg)
      if not (math.isfinite(rec["total_loss"]) and math.isfinite(rec["grad_norm"])):
        bar.close()
        ckpt.wait()
        good = ckpt.latest_step()
        raise FloatingPointError(
            f"loss is {rec['total_loss']} (grad norm {rec['grad_norm']}) at step {step_no}: "
            f"stopping; the last good checkpoint is step {good} in {ckpt.directory}")
      now = time.perf_counter()
      tps = tokens_per_step * steps_since / max(now - t_last, 1e-9)
      t_last, steps_since = now, 0
      rec = {"step": step_no, **rec, "tokens_per_s": tps,
             "mfu": tps * flops_tok / (peak * n_dev), **(extra or {}), "time": time.time()}
      writer.write(rec)
      if tb:
        tb.scalars(step_no, rec)
      bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{tps:,.0f}", refresh=False)
      bar.update(step_no - bar.n)
      if first is None:
        first = (step_no, now)
        bar.initial, bar.start_t = step_no, time.time()
      if lines:
        eta = ""
        if step_no > first[0]:
          eta = f", ETA {_duration((tc.steps - step_no) * (now - first[1]) / (step_no - first[0]))}"
        echo(f"step {step_no}/{tc.steps}: loss {rec['loss']:.4f}, {tps:,.0f} tokens/s{eta}")
      last = rec

    try:
      for step_no in range(start + 1, tc.steps + 1):
        micro = (tc.grad_accum, tc.batch_size // tc.grad_accum, tc.seq_len + 1)
        batch = jax.tree.map(lambda b: b.reshape(micro), next(it))
        position = it.state()
        state, logs = step_fn(state, to_devices(batch, batch_spec))
        steps_since += 1
        if pending is not None:
          read(*pending)
          pending = None
        want_eval = eval_set is not None and (step_no % tc.eval_every == 0
                                              or step_no == tc.steps)
        want_log = (step_no % tc.log_every == 0 or step_no == tc.steps or step_no == start + 1
                    or want_eval)
        extra = ({"eval_loss": evaluate(eval_fn, state, eval_set, tc, eval_spec)}
                 if want_eval else None)
        if step_no % tc.save_every == 0 or step_no == tc.steps:
          if want_log:
            read(step_no, logs, extra)  # checks the loss before the state is saved
          else:
            rec = jax.device_get(logs)
            if not (np.isfinite(rec["total_loss"]) and np.isfinite(rec["grad_norm"])):
              read(step_no, logs)  # raises with the message
          ckpt.save(step_no, saved(state), position, cfg, {**run_meta(tc, cfg), "run": run})
        elif want_eval:
          read(step_no, logs, extra)
        elif want_log:
          pending = (step_no, logs)
      if pending is not None:
        read(*pending)
    finally:
      close_run(bar, ckpt, writer, tb)
  echo(f"step {last.get('step')}: loss {last.get('loss', float('nan')):.4f}")
  return last
