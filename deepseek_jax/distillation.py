"""Distilling a DeepSeek teacher into a smaller DeepSeek student, two ways (R1's recipe and the
classic one).

Traces (`write_traces`): the teacher answers prompts under its chat template (sampled, several
answers per prompt if asked) and every answer becomes a JSONL row that the trainer's
`--data_format=chat` (or `prompt_completion`) reads, so a student is then fine-tuned on them with
`python -m deepseek_jax.train`. This is how DeepSeek-R1 was distilled into smaller models.

Logits (`distill`): the teacher and the student run side by side on the same mesh, each sharded
by the same rules; every step the frozen teacher's logits on the batch (full, or its top-k with
the rest as one bucket: `distill_loss`) are computed inside the jitted step, outside the
gradient, and the student minimises

  τ² · KL(teacher ‖ student) + ce_weight · CE + mtp_weight · MTP + balance terms

on the batch's target positions (every token of text; the assistant tokens of chat data). The
MTP and balance terms are the trainer's (`train_step`, through its `main_loss` and `teach`
hooks). The rest is the trainer's too: the model builder, mesh, data iterator, Orbax checkpoints
with the data position (a rerun in the same workdir resumes; one with other settings is refused
as the trainer refuses it), `metrics.jsonl` and TensorBoard files. The teacher is never saved.
With --eval_data, the held-out KL(teacher ‖ student) (full vocabulary, τ = 1) is logged as
`eval_kl`, and before the first step as `eval_kl_init`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax import chat, distill_loss, losses, optim, train_data, train_step, trainer
from deepseek_jax import data as data_lib
from deepseek_jax import metrics as metrics_lib
from deepseek_jax.convert.atomic import check_apart
from deepseek_jax.dtypes import from_name
from deepseek_jax.generation import generate
from deepseek_jax.pretrained import from_pretrained
from deepseek_jax.tokenizer import load_tokenizer, save_tokenizer, tokenizer_for_model
from deepseek_jax.train_config import TrainConfig
from deepseek_jax.workdir import Checkpointer, model_changes, run_changes


def _f(default, help: str, **meta):  # noqa: A002 - the flag's help text
  return dataclasses.field(default=default, metadata={"help": help, **meta})


@dataclasses.dataclass(frozen=True)
class DistillConfig(TrainConfig):
  """A logit-distillation run: the student is `TrainConfig`'s model (--preset, --config_json or
  --init_from), trained on --data; the teacher is read from --teacher."""

  teacher: str = _f("", "The teacher: released safetensors, one of our Orbax checkpoints or a "
                    "trainer workdir (same vocabulary as the student).")
  kl_topk: int = _f(0, "Distil on the teacher's k most likely tokens, the rest of the "
                    "vocabulary as one bucket (0: the full vocabulary).", lower=0)
  kl_temperature: float = _f(1.0, "Softmax temperature of teacher and student in the KL (the "
                             "loss is scaled by its square).")
  ce_weight: float = _f(0.0, "Weight of the data's own next-token cross-entropy added to the KL.",
                        lower=0.0)

  def __post_init__(self):
    super().__post_init__()  # choices and the fields' bounds
    if not self.kl_temperature > 0:
      raise ValueError(f"--kl_temperature={self.kl_temperature}: must be > 0")


def _echo(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ traces


def read_prompts(path: str) -> list[list[dict]]:
  """The conversations to answer, from a JSONL file of `{"prompt": str}` rows (one user message)
  or `{"messages": [...]}` rows ending with a user message; other fields are ignored. Errors
  name the file and line."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--prompts={path}: no such file (expected JSONL prompt rows)")
  out = []
  for where, row in chat.jsonl_rows(path):
    if isinstance(row, dict) and isinstance(row.get("prompt"), str):
      out.append([{"role": "user", "content": row["prompt"]}])
    elif isinstance(row, dict) and "messages" in row:
      msgs = chat.check_messages(row["messages"], need_reply=False, where=f"{where}: messages")
      if msgs[-1]["role"] != "user":
        raise ValueError(f"{where}: messages must end with a user message (the prompt)")
      out.append(msgs)
    else:
      raise ValueError(f"{where}: expected {{\"prompt\": str}} or {{\"messages\": [...]}}")
  if not out:
    raise ValueError(f"--prompts={path}: no prompts")
  return out


def _with_system(conv: list[dict], system: str | None) -> list[dict]:
  if system and not any(m["role"] == "system" for m in conv):
    return [{"role": "system", "content": system}] + conv
  return conv


def trace_row(conv: list[dict], answer: str, fmt: str, **extra) -> dict[str, Any]:
  """One output row: {"messages": conv + [the assistant's answer]} ("messages"), or
  {"prompt", "completion"} ("prompt_completion": a single user message only)."""
  if fmt == "prompt_completion":
    if len(conv) != 1:
      raise ValueError("--output_format=prompt_completion holds one user message and the answer: "
                       "this prompt has a system message or several turns (use messages)")
    return {"prompt": conv[0]["content"], "completion": answer, **extra}
  return {"messages": conv + [{"role": "assistant", "content": answer}], **extra}


def write_jsonl(rows: Sequence[dict], path: str, *, overwrite: bool = False) -> None:
  """Writes rows as JSONL under a temporary name, then renames it into place."""
  path = os.path.abspath(path)
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"--output={path}: exists (pass --overwrite to replace it)")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      for r in rows:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def sample_traces(model, tokenizer, template: chat.ChatTemplate, convs: Sequence[list[dict]], *,
                  num_samples: int = 1, max_new_tokens: int = 256, temperature: float = 0.6,
                  top_p: float | None = 0.95, top_k: int | None = None, seed: int = 0,
                  prompt_batch: int = 8, system: str | None = None, keep_truncated: bool = False,
                  output_format: str = "messages") -> tuple[list[dict], dict[str, Any]]:
  """The teacher's answers as trace rows (num_samples per prompt, in prompt order), and counts.

  Each conversation (after `system`, unless it has one) is rendered with a generation prompt;
  `prompt_batch` prompts go through `generate` together, their G samples sharing one prefill.
  An answer is its tokens up to EOS, decoded; one cut by max_new_tokens is dropped unless
  `keep_truncated` (the template would close it with EOS, teaching the student to stop there).
  Rows also carry `sample` (its index among the prompt's) and `logprob` (the answer's
  log-probability under the sampling distribution).
  """
  if prompt_batch < 1:
    raise ValueError(f"--prompt_batch={prompt_batch}: must be >= 1")
  eos = -1 if tokenizer.eos_id is None else tokenizer.eos_id
  convs = [_with_system(c, system) for c in convs]
  for c in convs:  # fail before sampling anything
    trace_row(c, "", output_format)
  rows, dropped, new_tokens = [], 0, 0
  t0 = time.perf_counter()
  for b, start in enumerate(range(0, len(convs), prompt_batch)):
    part = convs[start:start + prompt_batch]
    ids = [template.prompt(c) for c in part]
    outs, lps = generate(model, ids, max_new_tokens, temperature=temperature, top_k=top_k,
                         top_p=top_p, seed=seed + b, eos_id=eos, num_samples=num_samples,
                         return_logprobs=True)
    for i, (toks, lp) in enumerate(zip(outs, lps)):
      new_tokens += len(toks)
      stopped = bool(toks) and toks[-1] == eos
      if not stopped and not keep_truncated:
        dropped += 1
        continue
      text = tokenizer.decode(toks[:-1] if stopped else toks)
      rows.append(trace_row(part[i // num_samples], text, output_format,
                            sample=i % num_samples, logprob=float(np.sum(lp))))
  stats = {"prompts": len(convs), "rows": len(rows), "dropped_truncated": dropped,
           "new_tokens": new_tokens, "seconds": time.perf_counter() - t0}
  return rows, stats


def write_traces(teacher: str, prompts: str, output: str, *, compute_dtype: str = "float32",
                 mesh=None, overwrite: bool = False, echo: Callable[[str], None] = _echo,
                 **sample_kw) -> dict[str, Any]:
  """`python -m deepseek_jax.distill --mode=traces`: reads the teacher (its tokenizer and chat
  template from the same directory), samples answers to --prompts and writes them to --output
  (atomically); returns the counts of `sample_traces`."""
  if not teacher:
    raise ValueError("--teacher is required (the model that answers)")
  if not os.path.isdir(teacher):
    raise FileNotFoundError(f"--teacher={teacher}: no such directory")
  if not output:
    raise ValueError("--output is required (the traces JSONL file)")
  if os.path.exists(output) and not overwrite:
    raise FileExistsError(f"--output={output}: exists (pass --overwrite to replace it)")
  convs = read_prompts(prompts)
  dtype = from_name(compute_dtype, "--compute_dtype")
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    model = from_pretrained(teacher, dtype=dtype, mesh=mesh)
    tokenizer = tokenizer_for_model(teacher)
    template = chat.ChatTemplate(chat.read_template(teacher), tokenizer)
    rows, stats = sample_traces(model, tokenizer, template, convs, **sample_kw)
  if not rows:
    raise ValueError(f"no answer ended within --max_new_tokens ({stats['dropped_truncated']} "
                     "cut): raise --max_new_tokens or pass --keep_truncated")
  write_jsonl(rows, output, overwrite=overwrite)
  echo(f"wrote {stats['rows']} traces for {stats['prompts']} prompts to {output} "
       f"({stats['dropped_truncated']} cut by --max_new_tokens dropped; "
       f"{stats['new_tokens'] / max(stats['seconds'], 1e-9):.1f} sampled tokens/s)")
  return stats


# ------------------------------------------------------------------------------------ logits


def target_mask(batch) -> jax.Array:
  """[b, T] float32: the positions whose next token is a target (chat: assistant tokens, never
  across packed conversations; text: all)."""
  batch = train_step.as_batch(batch)
  tokens = batch["tokens"]
  mask = jnp.ones(tokens[:, 1:].shape, jnp.float32)
  if "loss_mask" in batch:
    mask = mask * batch["loss_mask"][:, 1:].astype(jnp.float32)
  if "segment_ids" in batch:
    seg = batch["segment_ids"]
    mask = mask * (seg[:, 1:] == seg[:, :-1]).astype(jnp.float32)
  return mask


def _fresh(tree):
  """New Variables holding the same arrays (nnx.scan refuses ones from an outer trace)."""
  return jax.tree.map(lambda a: a, tree)


def teacher_logits(t_graphdef, t_state, batch) -> jax.Array:
  """The teacher's float32 logits [b, T, V] on a batch's inputs (packed segments kept apart)."""
  model = nnx.merge(t_graphdef, _fresh(t_state))
  inputs, kw = train_step.model_inputs(batch)
  return jax.lax.stop_gradient(model.forward(inputs, with_mtp=False, **kw).logits)


def make_teach(t_graphdef, dc: DistillConfig) -> Callable:
  """The `teach` hook of `train_step.make_train_step`: the teacher's side of the KL."""
  def teach(t_state, batch):
    logits = teacher_logits(t_graphdef, t_state, batch)                  # [b, T, V]
    if dc.kl_topk:
      return {"teacher": distill_loss.teacher_topk(logits, dc.kl_topk, dc.kl_temperature)}
    return {"teacher": logits}
  return teach


def make_main_loss(dc: DistillConfig) -> Callable:
  """The `main_loss` hook: τ²·KL(teacher ‖ student) (+ ce_weight · CE) on the target mask."""
  def main_loss(logits, targets, mask, batch):
    kl, _ = distill_loss.forward_kl(batch["teacher"], logits, mask, dc.kl_temperature)
    total = kl
    if dc.ce_weight:
      total = total + dc.ce_weight * losses.cross_entropy(logits, targets, mask)[0]
    return total, {"kl": kl}
  return main_loss


def make_eval_kl(graphdef, t_graphdef) -> Callable:
  """eval(state, t_state, batch [b, T+1]) -> (Σ KL(teacher ‖ student) over the targets, their
  count): the full-vocabulary KL at temperature 1, the figure distillation should lower."""
  def eval_kl(state, t_state, batch):
    student = nnx.merge(graphdef, _fresh(state["params"]), _fresh(state["frozen"]),
                        _fresh(state["rest"]))
    inputs, kw = train_step.model_inputs(batch)
    logits = student.forward(inputs, with_mtp=False, **kw).logits
    kl = distill_loss.kl_full(teacher_logits(t_graphdef, t_state, batch), logits)  # [b, T]
    mask = target_mask(batch)
    return jnp.sum(kl * mask), jnp.sum(mask)
  return eval_kl


def heldout_kl(eval_fn, state, t_state, dataset, batch_size: int, spec) -> float:
  """Mean KL(teacher ‖ student) per target over a held-out set (`make_eval_kl`, jitted)."""
  total = count = 0.0
  for batch in train_data.eval_batches(dataset, batch_size):
    s, n = jax.device_get(eval_fn(state, t_state, trainer.to_devices(batch, spec)))
    total, count = total + float(s), count + float(n)
  return total / max(count, 1.0)


def _tokenizer(dc: DistillConfig, vocab_size: int):
  """--tokenizer; "auto" is the one the student's --init_from directory carries, else the
  teacher's."""
  if dc.tokenizer != "auto":
    return load_tokenizer(dc.tokenizer)
  name, where = ("--init_from", dc.init_from) if dc.init_from else ("--teacher", dc.teacher)
  try:
    return tokenizer_for_model(where, vocab_size)
  except FileNotFoundError as e:
    raise ValueError(f"{name}={where}: {e}") from e


def _dataset(dc: DistillConfig, tokenizer, workdir: str, path: str, echo):
  """Text as the trainer packs it; chat rows as the trainer packs them, under the chat template
  of the student's --init_from directory, else the teacher's."""
  return train_data.make_dataset(dataclasses.replace(dc, init_from=dc.init_from or dc.teacher),
                                 tokenizer, workdir, path=path, log=echo)


def _check(dc: DistillConfig, cfg, t_cfg, tokenizer) -> None:
  if t_cfg.vocab_size != cfg.vocab_size:
    raise ValueError(f"--teacher={dc.teacher}: vocab_size {t_cfg.vocab_size} differs from the "
                     f"student's {cfg.vocab_size}; logit distillation needs one vocabulary")
  if dc.kl_topk > cfg.vocab_size:
    raise ValueError(f"--kl_topk={dc.kl_topk} is above the vocabulary size {cfg.vocab_size}")
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(f"--tokenizer={dc.tokenizer}: vocab_size {tokenizer.vocab_size} exceeds the "
                     f"model's vocab_size {cfg.vocab_size}")
  if dc.seq_len > t_cfg.max_position_embeddings:
    raise ValueError(f"--seq_len={dc.seq_len} is above the teacher's max_position_embeddings="
                     f"{t_cfg.max_position_embeddings}")


def _record(logs, step_no: int, tps: float, extra: dict) -> dict[str, Any]:
  rec = {k: float(logs[k]) for k in ("loss", "kl", "mtp_loss", "aux_loss", "total_loss",
                                     "grad_norm", "lr")}
  if not (math.isfinite(rec["total_loss"]) and math.isfinite(rec["grad_norm"])):
    raise FloatingPointError(f"loss is {rec['total_loss']} (grad norm {rec['grad_norm']}) at "
                             f"step {step_no}: stopping")
  cvs = np.asarray(logs["load_cv"])
  if cvs.size:
    rec["load_cv_mean"] = float(np.mean(cvs))
  return {"step": step_no, **rec, "tokens_per_s": tps, **extra, "time": time.time()}


def distill(dc: DistillConfig, *, echo: Callable[[str], None] = _echo) -> dict[str, Any]:
  """Trains (or resumes) the student against the teacher as `dc` says; returns the last logged
  metrics (see the module docstring)."""
  if not dc.workdir:
    raise ValueError("--workdir is required (checkpoints and metrics.jsonl go there)")
  if not dc.teacher:
    raise ValueError("--teacher is required (the model to distil)")
  if not os.path.isdir(dc.teacher):
    raise FileNotFoundError(f"--teacher={dc.teacher}: no such directory")
  workdir = os.path.abspath(dc.workdir)
  check_apart(workdir, {"--teacher": dc.teacher, "--init_from": dc.init_from},
              output_name="--workdir")
  os.makedirs(workdir, exist_ok=True)
  cfg = trainer.model_config(dc)
  dtype = from_name(dc.compute_dtype, "--compute_dtype")
  mesh = trainer.make_mesh(dc)
  trainer.check_inputs(dc, cfg, mesh.shape["data"] * mesh.shape["fsdp"])
  tokenizer = _tokenizer(dc, cfg.vocab_size)
  save_tokenizer(tokenizer, workdir)  # generation and the converters find it there
  dataset = _dataset(dc, tokenizer, workdir, dc.data, echo)
  eval_set = _dataset(dc, tokenizer, workdir, dc.eval_data, echo) if dc.eval_data else None
  it = data_lib.DataIterator(dataset, dc.batch_size, dc.seed)
  # a resumed run is compared with its checkpoint before anything is built (as the trainer does)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), dc.keep)
  try:  # the checkpoint manager is closed on every way out
    saved_meta = ckpt.meta() if ckpt.latest_step() is not None else None
    run = {"seq_len": dc.seq_len, "batch_size": dc.batch_size, "grad_accum": dc.grad_accum,
           "seed": dc.seed, "data": dataset.key, "teacher": os.path.abspath(dc.teacher),
           "kl_topk": dc.kl_topk, "kl_temperature": dc.kl_temperature}
    run_diff = run_changes(saved_meta, run) if saved_meta is not None else []
    if run_diff and not dc.allow_resume_changes:
      raise ValueError(f"{workdir}: resuming with other settings than its checkpoint's run ("
                       f"{'; '.join(run_diff)}); pass --allow_resume_changes to continue with "
                       "them, or use a new --workdir")
    tx = optim.make_optimizer(dc.optim_config())
    with jax.set_mesh(mesh):
      echo(f"loading the teacher from {dc.teacher}")
      teacher = from_pretrained(dc.teacher, dtype=dtype, mesh=mesh)
      _check(dc, cfg, teacher.cfg, tokenizer)
      t_graphdef, t_state = nnx.split(teacher)
      del teacher
      model = trainer.build_model(dc, cfg, dtype, echo, mesh)
      cfg = model.cfg
      graphdef, state = trainer.split_state(model, tx, dc)
      del model
      metrics_path = os.path.join(workdir, "metrics.jsonl")
      meta = {**trainer.run_meta(dc, cfg), "teacher": os.path.abspath(dc.teacher), "run": run}
      start = 0
      if saved_meta is not None:
        diff = model_changes(saved_meta, cfg)
        if diff:
          raise ValueError(f"{workdir}: its checkpoint holds another student config ("
                           f"{'; '.join(diff[:5])}{'; ...' if len(diff) > 5 else ''}); use a new "
                           "--workdir or the same --preset/--config_json")
        restored, position, _ = ckpt.restore(trainer.saved(state))
        state = dict(restored, frozen=state["frozen"])
        if any(d.startswith(("--data", "--seq_len")) for d in run_diff):
          position = {"epoch": 0, "index": 0}  # positions of the old sequences mean nothing now
        it.restore(position)
        start = int(state["step"])
        echo(f"resumed from step {start} ({ckpt.directory})")
      metrics_lib.truncate_jsonl(metrics_path, start)
      if start >= dc.steps:
        last = metrics_lib.read_jsonl(metrics_path)
        return last[-1] if last else {"step": start}

      batch_spec = trainer.batch_sharding(mesh)
      eval_spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
      state_sh = trainer.state_shardings(mesh, state)
      state = jax.device_put(state, state_sh)
      replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      step_fn = jax.jit(train_step.make_train_step(graphdef, tx, cfg, dc,
                                                   main_loss=make_main_loss(dc),
                                                   teach=make_teach(t_graphdef, dc)),
                        donate_argnums=(0,), out_shardings=(state_sh, replicated))
      kl_fn = jax.jit(make_eval_kl(graphdef, t_graphdef))
      ce_fn = jax.jit(train_step.make_eval_step(graphdef, cfg, dc))
      micro_rows = dc.batch_size // dc.grad_accum

      def evaluate() -> dict[str, float]:
        return {"eval_kl": heldout_kl(kl_fn, state, t_state, eval_set, micro_rows, eval_spec),
                "eval_loss": trainer.evaluate(ce_fn, state, eval_set, dc, eval_spec)}

      first: dict[str, float] = {}
      if eval_set is not None and start == 0:
        first = {"eval_kl_init": evaluate()["eval_kl"]}
        echo(f"held-out KL(teacher || student) before distillation: {first['eval_kl_init']:.4f}")
      echo(f"distilling into {cfg.num_params(include_mtp=True):,} parameters from step {start} to "
           f"{dc.steps} ({'top-%d' % dc.kl_topk if dc.kl_topk else 'full'} KL, "
           f"τ={dc.kl_temperature}): batch {dc.batch_size} x {dc.seq_len} tokens")
      writer = metrics_lib.JsonlWriter(metrics_path)
      tb = (metrics_lib.EventFileWriter(os.path.join(workdir, "tensorboard"))
            if dc.tensorboard else None)
      bar = metrics_lib.progress_bar(dc.steps, initial=start, enabled=dc.progress, unit="step")
      last: dict[str, Any] = {}
      t_last, since = time.perf_counter(), 0
      try:
        for step_no in range(start + 1, dc.steps + 1):
          micro = (dc.grad_accum, micro_rows, dc.seq_len + 1)
          batch = jax.tree.map(lambda b: b.reshape(micro), next(it))
          position = it.state()
          state, logs = step_fn(state, trainer.to_devices(batch, batch_spec), t_state)
          since += 1
          final = step_no == dc.steps
          want_eval = eval_set is not None and (step_no % dc.eval_every == 0 or final)
          saving = step_no % dc.save_every == 0 or final
          if step_no % dc.log_every == 0 or final or step_no == start + 1 or want_eval or saving:
            logs = jax.device_get(logs)
            now = time.perf_counter()
            tps = dc.batch_size * dc.seq_len * since / max(now - t_last, 1e-9)
            extra = {**first, **(evaluate() if want_eval else {})}
            last = _record(logs, step_no, tps, extra)
            t_last, since, first = now, 0, {}
            writer.write(last)
            if tb:
              tb.scalars(step_no, last)
            bar.set_postfix(kl=f"{last['kl']:.4f}", refresh=False)
            bar.update(step_no - bar.n)
          if saving:
            ckpt.save(step_no, trainer.saved(state), position, cfg, meta)
      finally:
        bar.close()
        writer.close()
        if tb:
          tb.close()
  finally:
    ckpt.close()
  if "eval_kl" in last:
    echo(f"step {last['step']}: held-out KL(teacher || student) {last['eval_kl']:.4f}")
  echo(f"step {last.get('step')}: distillation loss {last.get('kl', float('nan')):.4f}")
  return last
