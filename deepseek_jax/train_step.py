"""One training step: DeepSeek-V3's loss, its gradients, and the router-bias update.

  loss = CE + λ·MTP + α·Σ_layers seq_balance (+ α_V2·Σ_layers expert_balance when asked),
         the MTP blocks' balance terms weighted by λ too;
  gradients summed over `grad_accum` micro-batches (mean), clipped, AdamW;
  then, outside the gradient, every `RouterBias` variable (noaux_tc's correction bias) moves by
  γ·sign(mean load − load).

A batch is {"tokens" [b, T+1]} (text: every next token is a target), plus for chat data
"loss_mask" [b, T+1] (the tokens the loss counts: assistant replies) and "segment_ids" [b, T+1]
(packed conversations: attention stays in a segment, positions restart, and no target crosses
into the next conversation); a bare token array is a text batch.

The state is {"params" (what is trained: every Param, or the LoRA adapters alone), "frozen" (a
LoRA run's base weights; absent or empty otherwise), "rest" (router biases), "opt_state",
"step"}. `make_train_step` returns a pure function of (state, batch); `trainer` jits it.

Two hooks let another objective reuse the step (logit distillation does): `main_loss` replaces
the CE term (the MTP and balance terms stay), and `teach` adds, outside the gradient, inputs that
each micro-batch needs (a frozen teacher's outputs), from a third argument of the step.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from deepseek_jax import losses, optim
from deepseek_jax.config import DeepseekConfig
from deepseek_jax.moe import RouterBias
from deepseek_jax.train_config import TrainConfig


def expert_alpha(tc: TrainConfig, cfg: DeepseekConfig) -> float:
  """V2's expert-level balance weight: the flag, else the config's unless routing is noaux_tc."""
  if tc.expert_aux_alpha is not None:
    return float(tc.expert_aux_alpha)
  return 0.0 if cfg.topk_method == "noaux_tc" else float(cfg.aux_loss_alpha)


def as_batch(batch) -> dict[str, jax.Array]:
  """A bare token array [..., T+1] as a text batch; a dict passes through."""
  return batch if isinstance(batch, dict) else {"tokens": batch}


def _segment_positions(seg: jax.Array) -> jax.Array:
  """Positions restarting in every segment of seg [b, T] (jnp twin of chat.segment_positions)."""
  idx = jnp.broadcast_to(jnp.arange(seg.shape[-1], dtype=jnp.int32), seg.shape)
  new = jnp.concatenate([jnp.ones(seg.shape[:-1] + (1,), bool), seg[:, 1:] != seg[:, :-1]], -1)
  return idx - jax.lax.cummax(jnp.where(new, idx, 0), axis=1)


def model_inputs(batch) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(inputs [b, T], `model.forward` keyword arguments) of a batch: a packed batch's positions
  restart in each segment and attention stays inside it."""
  batch = as_batch(batch)
  inputs = batch["tokens"][:, :-1]                                        # [b, T]
  seg = batch.get("segment_ids")
  if seg is None:
    return inputs, {}
  seg_in = seg[:, :-1]
  return inputs, {"positions": _segment_positions(seg_in), "segment_ids": seg_in}


def make_loss_fn(graphdef, cfg: DeepseekConfig, tc: TrainConfig,
                 main_loss: Callable | None = None) -> Callable:
  """loss(params, rest, batch, frozen=None) -> (total, aux) for one micro-batch (see above).

  `main_loss(logits [b, T, V], targets [b, T], mask [b, T] or None, batch) -> (value, logs)`
  replaces the CE term of the total; "loss" in the logs stays the CE, the hook's logs join it.
  """
  alpha_v2 = expert_alpha(tc, cfg)
  n_main = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))  # routers before MTP's

  def loss_fn(params, rest, batch, frozen=None):
    # fresh Variables for the frozen base at this trace level (nnx.scan refuses outer ones)
    frozen = () if frozen is None else (jax.tree.map(lambda a: a, frozen),)
    model = nnx.merge(graphdef, params, *frozen, rest)
    batch = as_batch(batch)
    targets = batch["tokens"][:, 1:]                                     # [b, T]
    seg = batch.get("segment_ids")
    mask = batch.get("loss_mask")
    mask = None if mask is None else mask[:, 1:].astype(jnp.float32)    # the target counts
    inputs, kw = model_inputs(batch)
    out = model.forward(inputs, with_mtp=True, **kw)
    real = None
    if seg is not None:
      seg_in, seg_tgt = seg[:, :-1], seg[:, 1:]
      same = (seg_tgt == seg_in).astype(jnp.float32)                     # no target across
      mask = same if mask is None else mask * same
      real = (seg_in > 0).astype(jnp.float32)                            # not padding
    ce, n_targets = losses.cross_entropy(out.logits, targets, mask)
    main, main_logs = (ce, {}) if main_loss is None else main_loss(out.logits, targets, mask,
                                                                   batch)
    mtp, per_depth = losses.mtp_loss(out.mtp_logits, targets, mask,
                                     None if seg is None else seg)
    aux = jnp.zeros((), jnp.float32)
    for i, r in enumerate(out.router):
      # An MTP block's balance terms belong to the MTP objective: weighted by λ as well, so that
      # λ = 0 leaves the main model exactly as without MTP layers.
      w = 1.0 if i < n_main else tc.mtp_weight
      if tc.seq_aux_alpha and w:
        aux += w * tc.seq_aux_alpha * losses.balance_loss(
            r.scores, r.topk_idx, mask=real, per_sequence=True, normalize_scores=True)
      if alpha_v2 and w:
        aux += w * alpha_v2 * losses.balance_loss(
            r.scores, r.topk_idx, mask=real, per_sequence=cfg.seq_aux, normalize_scores=False)
    total = main + tc.mtp_weight * mtp + aux
    e = cfg.n_routed_experts or 1
    counts = (jnp.stack([losses.expert_counts(r.topk_idx, e, real) for r in out.router])
              if out.router else jnp.zeros((0, e), jnp.float32))         # [R, E]
    logs = {"loss": ce, "targets": n_targets, "mtp_loss": mtp, "aux_loss": aux,
            "total_loss": total,
            "mtp_loss_depths": jnp.stack(per_depth) if per_depth else jnp.zeros((0,)),
            **main_logs}
    return total, (logs, counts)

  return loss_fn


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def update_router_biases(rest, counts: jax.Array, speed: float):
  """Applies `losses.bias_update` to every `RouterBias` variable in `rest`, in router order (main
  MoE layers, stacked or not, then the MTP blocks); counts [R, E]."""
  leaves, treedef = jax.tree_util.tree_flatten(rest, is_leaf=_is_variable)
  is_bias = [isinstance(v, RouterBias) for v in leaves]
  total = sum(int(np.prod(v.shape[:-1])) for v, b in zip(leaves, is_bias) if b)
  if total != counts.shape[0]:
    raise ValueError(f"router bias update: {total} biases for {counts.shape[0]} routers")
  out, r = [], 0
  for v, bias in zip(leaves, is_bias):
    if bias:
      n = int(np.prod(v.shape[:-1]))                                     # stacked layers
      v = v.replace(losses.bias_update(v[...], counts[r:r + n].reshape(v.shape), speed))
      r += n
    out.append(v)
  return jax.tree_util.tree_unflatten(treedef, out)


def make_train_step(graphdef, tx: optax.GradientTransformation, cfg: DeepseekConfig,
                    tc: TrainConfig, *, main_loss: Callable | None = None,
                    teach: Callable | None = None) -> Callable:
  """step(state, batch [A, b, T+1] leaves, extra=None) -> (state, metrics); A micro-batches
  (gradient accumulation). The state is described in the module docstring. Not jitted here.

  `main_loss`: see `make_loss_fn`. `teach(extra, micro_batch) -> dict` runs on each micro-batch
  before its gradient, outside it; its entries join the micro-batch (`main_loss` reads them).
  """
  # Differentiated with respect to the router biases too (their gradient is zero: they only steer
  # the discrete top-k choice, and it is discarded): nnx.scan refuses Variables that come from an
  # outer trace level, which a non-differentiated `rest` would be under a scanned model.
  vg = jax.value_and_grad(make_loss_fn(graphdef, cfg, tc, main_loss), argnums=(0, 1),
                          has_aux=True)

  def grad_fn(params, rest, batch, frozen):
    value, (grads, _) = vg(params, rest, batch, frozen)
    return value, grads

  schedule = optim.schedule(tc.optim_config())
  has_bias = cfg.is_moe and cfg.topk_method == "noaux_tc"

  def step(state, batch, extra=None):
    params, rest, frozen = state["params"], state["rest"], state.get("frozen")
    batch = as_batch(batch)
    n_micro = batch["tokens"].shape[0]

    def taught(b):
      return b if teach is None else {**b, **jax.lax.stop_gradient(teach(extra, b))}

    def micro(carry, b):
      (_, (logs, counts)), grads = grad_fn(params, rest, taught(b), frozen)
      acc = jax.tree.map(jnp.add, carry, (grads, logs, counts))
      return acc, None

    first = jax.tree.map(lambda a: a[0], batch)
    zero = jax.eval_shape(lambda: grad_fn(params, rest, taught(first), frozen))
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (zero[1], zero[0][1][0],
                                                                zero[0][1][1]))
    if n_micro == 1:
      (grads, logs, counts), _ = micro(zero, first)
    else:
      (grads, logs, counts), _ = jax.lax.scan(micro, zero, batch)
      grads = jax.tree.map(lambda g: g / n_micro, grads)
      logs = jax.tree.map(lambda v: v / n_micro, logs)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    params = optax.apply_updates(params, updates)
    if has_bias and tc.bias_update_speed:
      rest = update_router_biases(rest, counts, tc.bias_update_speed)
    load = jax.vmap(losses.load_stats)(counts)                            # per router [R]
    logs = dict(logs, grad_norm=grad_norm, lr=schedule(state["step"]),
                **{f"load_{k}": v for k, v in load.items()})
    new = dict(state, params=params, rest=rest, opt_state=opt_state, step=state["step"] + 1)
    return new, logs

  return step


def make_eval_step(graphdef, cfg: DeepseekConfig, tc: TrainConfig) -> Callable:
  """eval(state, batch [b, T+1] leaves) -> (summed next-token loss, number of targets)."""
  loss_fn = make_loss_fn(graphdef, cfg, tc)

  def eval_step(state, batch):
    _, (logs, _) = loss_fn(state["params"], state["rest"], batch, state.get("frozen"))
    return logs["loss"] * logs["targets"], logs["targets"]

  return eval_step
