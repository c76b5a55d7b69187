"""The GRPO objective (DeepSeekMath section 4.1, as DeepSeek-R1 trained with it) and its variants,
as pure functions of per-token log-probabilities.

For each prompt q the sampler draws a group of G completions o_1..o_G from the old policy π_old
and rule-based rewards score them r_1..r_G. Outcome supervision gives every token of o_i the
same advantage
    A_i = (r_i - mean_j r_j) / (std_j r_j + eps)       (`scale_rewards`, the default; std over
                                                         the group, ddof 0, eps 1e-4)
    A_i =  r_i - mean_j r_j                             (scale_rewards=False: Dr. GRPO)
Per token t of o_i, with the ratio ρ = π_θ(o_it | q, o_i<t) / π_old(o_it | q, o_i<t):
    surrogate = min(ρ A_i, clip(ρ, 1 - ε_low, 1 + ε_high) A_i)        (ε 0.2 both sides)
    kl        = π_ref/π_θ - log(π_ref/π_θ) - 1                        (k3: unbiased, >= 0)
    ℓ         = -(surrogate - β kl)                                   (β 0.001 as R1; 0 allowed)
and the loss averages ℓ over the batch's B completions (`loss_type`):
    grpo     L = 1/B Σ_i 1/|o_i| Σ_t ℓ_it     per-sequence means, then their mean (the papers)
    dapo     L = Σ_i Σ_t ℓ_it / Σ_i |o_i|     one mean over all tokens (DAPO's token level)
    dr_grpo  L = Σ_i Σ_t ℓ_it / (B · N_max)   no length normalisation: a constant N_max, the
                                              longest completion allowed (Dr. GRPO)
At ρ = 1 (the first update after sampling) the clip is inactive and ∇ρ = ∇ log π_θ, so with
β = 0 the gradient is REINFORCE's with the group-mean baseline divided by the group std.
Several updates per batch of rollouts (μ > 1) reuse the sampler's π_old; the clip keeps them
near it.

The log-probabilities are those of the sampling distribution (temperature, top-k, top-p), as
`sampling.token_logprobs` computes them for both the sampler and the learner. With top-k or
top-p a sampled token can lie outside the current policy's or the reference's kept set (log-prob
-inf): the ratio is then 0 (its token is clipped or gives no gradient), and the KL estimator
reads both log-probabilities floored at `LOGP_FLOOR` so that it stays finite (a large penalty).

Legend: B completions in the batch, N completion positions, P prompts, G completions per prompt.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
STD_EPS = 1e-4
LOGP_FLOOR = -30.0  # the k3 KL's floor on log-probabilities (-inf under top-k / top-p)


def group_advantages(rewards: jax.Array, group_size: int, *, scale: bool = True,
                     eps: float = STD_EPS) -> jax.Array:
  """A_i from rewards [B] (B = P·G, prompt-major: the G of a prompt are consecutive) -> [B]."""
  r = rewards.astype(jnp.float32).reshape(-1, group_size)               # [P, G]
  centred = r - jnp.mean(r, axis=1, keepdims=True)
  if scale:
    centred = centred / (jnp.std(r, axis=1, keepdims=True) + eps)
  return centred.reshape(-1)


def k3_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
  """The k3 estimator of KL(π_θ || π_ref) per sampled token: e^(ref - logp) - (ref - logp) - 1
  (both floored at `LOGP_FLOOR`, so -inf entries give a finite value)."""
  d = jnp.maximum(ref_logp, LOGP_FLOOR) - jnp.maximum(logp, LOGP_FLOOR)
  return jnp.exp(d) - d - 1.0


class GRPOTerms(NamedTuple):
  """Per-batch figures of one loss evaluation (token-weighted means over completion tokens)."""
  loss: jax.Array
  kl: jax.Array             # mean k3 KL to the reference (0 when β = 0 and no reference)
  clip_fraction: jax.Array  # share of tokens where the clipped term is the one taken
  ratio_mean: jax.Array
  ratio_max_dev: jax.Array  # max |ρ - 1| over completion tokens


def grpo_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array, *,
              ref_logp: jax.Array | None = None, epsilon: float = 0.2,
              epsilon_high: float | None = None, beta: float = 0.001, loss_type: str = "grpo",
              max_len: int | None = None) -> GRPOTerms:
  """The objective of the module docstring.

  logp, old_logp, ref_logp, mask: [B, N] (mask 1 on completion tokens, float or bool);
  advantages [B]; `max_len` (N_max of dr_grpo) defaults to N. `ref_logp` is needed when
  beta > 0. Gradients flow through `logp` only.
  """
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"loss_type={loss_type!r}: expected one of {LOSS_TYPES}")
  if beta and ref_logp is None:
    raise ValueError("grpo_loss: beta > 0 needs ref_logp (the reference's log-probabilities)")
  eps_hi = epsilon if epsilon_high is None else epsilon_high
  m = mask.astype(jnp.float32)                                           # [B, N]
  logp = logp.astype(jnp.float32)
  old = jax.lax.stop_gradient(old_logp.astype(jnp.float32))
  adv = jax.lax.stop_gradient(advantages.astype(jnp.float32))[:, None]  # [B, 1]
  # where a position is masked its log-probabilities may be anything: keep ρ finite there
  log_ratio = jnp.where(m > 0, logp - old, 0.0)
  ratio = jnp.exp(log_ratio)                                             # [B, N]
  clipped = jnp.clip(ratio, 1.0 - epsilon, 1.0 + eps_hi)
  surrogate = jnp.minimum(ratio * adv, clipped * adv)
  per_token = -surrogate
  kl = jnp.zeros_like(per_token)
  if ref_logp is not None:
    ref = jax.lax.stop_gradient(ref_logp.astype(jnp.float32))
    kl = k3_kl(logp, jnp.where(m > 0, ref, logp))
    if beta:
      per_token = per_token + beta * kl
  tokens = jnp.sum(m)
  if loss_type == "grpo":
    lengths = jnp.maximum(jnp.sum(m, axis=1), 1.0)                       # [B]
    loss = jnp.mean(jnp.sum(per_token * m, axis=1) / lengths)
  elif loss_type == "dapo":
    loss = jnp.sum(per_token * m) / jnp.maximum(tokens, 1.0)
  else:
    n_max = m.shape[1] if max_len is None else max_len
    loss = jnp.sum(per_token * m) / (m.shape[0] * n_max)
  was_clipped = ((ratio < 1.0 - epsilon) & (adv < 0)) | ((ratio > 1.0 + eps_hi) & (adv > 0))
  mean = lambda x: jnp.sum(x * m) / jnp.maximum(tokens, 1.0)
  return GRPOTerms(loss, mean(kl), mean(was_clipped.astype(jnp.float32)), mean(ratio),
                   jnp.max(jnp.where(m > 0, jnp.abs(ratio - 1.0), 0.0)))


def entropy(filtered_logits: jax.Array) -> jax.Array:
  """Entropy [...] of the distributions softmax(filtered_logits [..., V]) (-inf entries allowed)."""
  logp = jax.nn.log_softmax(filtered_logits.astype(jnp.float32), axis=-1)
  p = jnp.exp(logp)
  return -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)
