"""One training step: DeepSeek-V3's loss, its gradients, and the router-bias update.

  loss = CE + λ·MTP + α·Σ_layers seq_balance (+ α_V2·Σ_layers expert_balance when asked),
         the MTP blocks' balance terms weighted by λ too;
  gradients summed over `grad_accum` micro-batches (mean), clipped, AdamW;
  then, outside the gradient, every `RouterBias` variable (noaux_tc's correction bias) moves by
  γ·sign(mean load − load).

`make_train_step` returns a pure function of (state, tokens); the loop in `trainer` jits it.
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
    load = jax.vmap(losses.load_stats)(counts)                            # per router [R]
    logs = dict(logs, grad_norm=grad_norm, lr=schedule(state["step"]),
                **{f"load_{k}": v for k, v in load.items()})
    new = {"params": params, "rest": rest, "opt_state": opt_state, "step": state["step"] + 1}
    return new, logs

  return step
