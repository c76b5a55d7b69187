"""The GRPO learner: a batch of rollouts laid out for the model, the policy's and the reference's
log-probabilities of the sampled tokens, and one clipped policy-gradient update.

Batch (`learner_batch`, numpy, from `generation.Generation.arrays()` and the rewards), row b =
completion b (prompt-major: b // G is its prompt):
  "tokens" [B, S] int32     the prompt, its completion right after it, then zeros (S: the
                            longest prompt + completion rounded up to a multiple of
                            `LENGTH_MULTIPLE`, so few shapes compile);
  "mask" [B, S-1] float32   1 where the next token (the target) is a completion token;
  "old_logp" [B, S-1]       the sampler's log-probability of that target (π_old);
  "advantages" [B]          `grpo_loss.group_advantages` of the rewards;
  "routes" (routing replay) per MoE layer [B, S-1, K] int32: the experts each input token
                            used when it was sampled;
  "ref_logp" [B, S-1]       added by `make_reference_fn` when β > 0.
Position t of the model's input predicts target t + 1, so the policy's log-probabilities are
read off `model.forward(tokens[:, :-1])` with `sampling.filter_logits` (the sampling
distribution: temperature, top-k, top-p) and a log-softmax: the sampler's very numbers, up to
float rounding and the attention path (absorbed in the sampler's decode, expanded here).

The reference (`make_reference_fn`, only when β > 0) is the same model with the LoRA adapters'
contribution switched off (every adapter zeroed for that forward: (x·0)·0 = 0, so it is the base
exactly, and no second copy of the base exists), or, when every weight is trained, a frozen
copy of the initial weights kept in the state as "ref". With routing replay the reference runs
through the same experts as the policy. The router biases are the current ones for both (they
steer the choice of experts only, and are frozen unless --bias_update_speed > 0).

The state is the SFT trainer's ({"params", "frozen", "rest", "opt_state", "step"}, see
`train_step`), plus "ref" for full fine-tuning with β > 0.

Legend: B completions, S sequence length (prompt bucket + completion capacity), N completion
capacity, V vocab, K experts per token, R MoE layers.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from deepseek_jax import grpo_loss, losses
from deepseek_jax.config import DeepseekConfig
from deepseek_jax.moe import RouterBias
from deepseek_jax.sampling import SamplingParams, filter_logits
from deepseek_jax.train_step import update_router_biases


LENGTH_MULTIPLE = 16


# ------------------------------------------------------------------------------------ batch
def learner_batch(rollout: dict[str, Any], rewards: np.ndarray, group_size: int, *,
                  scale_rewards: bool = True, routing_replay: bool = False) -> dict[str, Any]:
  """The learner's batch (module docstring) from `Generation.arrays()` and rewards [B]."""
  tokens, counts = rollout["tokens"], rollout["counts"]                   # [B, N], [B]
  b, n = tokens.shape
  prompt_tok = np.repeat(rollout["prompt_tokens"], group_size, axis=0)    # [B, T]
  plen = np.repeat(rollout["prompt_lengths"], group_size, axis=0)         # [B]
  if len(plen) != b:
    raise ValueError(f"learner_batch: {len(plen)} prompt rows x group {group_size} != {b} "
                     "completions")
  full = prompt_tok.shape[1] + n                                          # the cache length
  longest = int(np.max(plen + counts))
  s = min(full, -(-longest // LENGTH_MULTIPLE) * LENGTH_MULTIPLE)
  t = min(prompt_tok.shape[1], s)
  seq = np.zeros((b, s), np.int32)
  seq[:, :t] = np.where(np.arange(t) < plen[:, None], prompt_tok[:, :t], 0)
  cols = plen[:, None] + np.arange(n)                                     # [B, N] positions
  live = np.arange(n)[None, :] < counts[:, None]
  rows = np.broadcast_to(np.arange(b)[:, None], (b, n))
  seq[rows[live], cols[live]] = tokens[live]
  mask = np.zeros((b, s - 1), np.float32)
  old = np.zeros((b, s - 1), np.float32)
  mask[rows[live], cols[live] - 1] = 1.0                                  # target t + 1
  old[rows[live], cols[live] - 1] = rollout["logprobs"][live]
  adv = np.asarray(grpo_loss.group_advantages(jnp.asarray(rewards, jnp.float32), group_size,
                                              scale=scale_rewards))
  batch = {"tokens": seq, "mask": mask, "old_logp": old, "advantages": adv}
  if routing_replay:
    if "routes" not in rollout:
      raise ValueError("learner_batch: routing_replay needs a rollout with record_routing=True")
    batch["routes"] = tuple(np.asarray(r[:, :s - 1]) for r in rollout["routes"])
  return batch


# ------------------------------------------------------------------------------------ forward
def policy_logprobs(model, batch: dict, sampling: SamplingParams, *, replay: bool
                    ) -> tuple[jax.Array, jax.Array, tuple]:
  """(log π(target) [B, S-1], entropy of the sampling distribution [B, S-1], router outputs)."""
  tokens = batch["tokens"]
  inputs, targets = tokens[:, :-1], tokens[:, 1:]                         # [B, S-1]
  routing = tuple(batch["routes"]) if replay else None
  out = model.forward(inputs, with_mtp=False, routing=routing)
  v = out.logits.shape[-1]
  filtered = filter_logits(out.logits.reshape(-1, v), sampling)           # [B*(S-1), V]
  logp_all = jax.nn.log_softmax(filtered, axis=-1)
  logp = jnp.take_along_axis(logp_all, targets.reshape(-1, 1), axis=-1).reshape(targets.shape)
  ent = jax.lax.stop_gradient(grpo_loss.entropy(filtered)).reshape(targets.shape)
  mask = batch["mask"] > 0
  return jnp.where(mask, logp, 0.0), jnp.where(mask, ent, 0.0), out.router


def _fresh(tree):
  """New Variables for this trace level (nnx.scan refuses ones made at an outer level)."""
  return jax.tree.map(lambda a: a, tree)


def make_reference_fn(graphdef, sampling: SamplingParams, *, lora: bool, replay: bool
                      ) -> Callable:
  """ref(state, batch) -> the reference's log-probabilities [B, S-1] (module docstring)."""

  def ref(state, batch):
    if lora:  # adapters off: every LoRA variable zero for this forward
      params = jax.tree.map(jnp.zeros_like, state["params"])
      model = nnx.merge(graphdef, _fresh(params), _fresh(state["frozen"]), _fresh(state["rest"]))
    else:
      model = nnx.merge(graphdef, _fresh(state["ref"]), _fresh(state["frozen"]),
                        _fresh(state["rest"]))
    logp, _, _ = policy_logprobs(model, batch, sampling, replay=replay)
    return jax.lax.stop_gradient(logp)

  return ref


def router_bias_rows(rest) -> int:
  """How many routers have a `RouterBias` in `rest` (stacked layers counted one by one)."""
  leaves = jax.tree.leaves(rest, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return sum(int(np.prod(v.shape[:-1])) for v in leaves if isinstance(v, RouterBias))


def make_update(graphdef, tx: optax.GradientTransformation, cfg: DeepseekConfig,
                sampling: SamplingParams, *, epsilon: float, epsilon_high: float | None,
                beta: float, loss_type: str, max_len: int, replay: bool,
                bias_update_speed: float = 0.0) -> Callable:
  """update(state, batch) -> (state, metrics): one AdamW step on the GRPO loss of the whole batch
  (the loop calls it μ times per batch of rollouts). Not jitted here."""
  e = cfg.n_routed_experts or 1
  has_bias = cfg.is_moe and cfg.topk_method == "noaux_tc"

  def loss_fn(params, rest, batch, frozen):
    model = nnx.merge(graphdef, params, _fresh(frozen), rest)
    logp, ent, router = policy_logprobs(model, batch, sampling, replay=replay)
    terms = grpo_loss.grpo_loss(logp, batch["old_logp"], batch["advantages"], batch["mask"],
                                ref_logp=batch.get("ref_logp"), epsilon=epsilon,
                                epsilon_high=epsilon_high, beta=beta, loss_type=loss_type,
                                max_len=max_len)
    m = batch["mask"]
    entropy = jnp.sum(ent * m) / jnp.maximum(jnp.sum(m), 1.0)
    counts = (jnp.stack([losses.expert_counts(r.topk_idx, e, m) for r in router])
              if router else jnp.zeros((0, e), jnp.float32))              # [R, E]
    return terms.loss, (terms, entropy, counts)

  vg = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)

  def update(state, batch):
    params, rest = state["params"], state["rest"]
    (_, (terms, entropy, counts)), (grads, _) = vg(params, rest, batch, state["frozen"])
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    params = optax.apply_updates(params, updates)
    if has_bias and bias_update_speed:
      # the MTP blocks' routers (last in router order) do not run in the learner's forward: zero
      # counts leave their biases as they are
      missing = router_bias_rows(rest) - counts.shape[0]
      counts = jnp.concatenate([counts, jnp.zeros((missing, e), counts.dtype)])
      rest = update_router_biases(rest, counts, bias_update_speed)
    logs = {**terms._asdict(), "entropy": entropy, "grad_norm": grad_norm}
    return dict(state, params=params, rest=rest, opt_state=opt_state, step=state["step"]), logs

  return update
