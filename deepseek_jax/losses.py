"""Training losses and load-balancing rules of DeepSeek-V2/V3.

Legend: B batch, T sequence positions, V vocabulary, E routed experts, K experts per token.

All reductions run in float32 whatever the compute dtype. `mask` arguments are [B, T] (1 = a real
target, 0 = padding); None means every position counts.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def _mask_or_ones(mask: jax.Array | None, shape) -> jax.Array:
  return jnp.ones(shape, jnp.float32) if mask is None else mask.astype(jnp.float32)


def cross_entropy(logits: jax.Array, targets: jax.Array,
                  mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Mean next-token cross-entropy over unmasked positions, and their count.

  L = -1/N Σ_{b,t} m_{b,t} log softmax(z_{b,t})[y_{b,t}],  N = Σ m  (z in float32).

  logits [B, T, V]; targets [B, T] int (already shifted: targets[t] is the token after input t).
  """
  logits = logits.astype(jnp.float32)                                    # [B, T, V]
  logz = jax.nn.logsumexp(logits, axis=-1)                               # [B, T]
  picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  m = _mask_or_ones(mask, targets.shape)                                 # [B, T]
  n = jnp.sum(m)
  return jnp.sum((logz - picked) * m) / jnp.maximum(n, 1.0), n


def mtp_targets(targets: jax.Array, mask: jax.Array | None, depth: int,
                segments: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Targets and mask for MTP depth k >= 1: position t predicts token t+k+1 = targets[t+k].

  The last k positions have no target and are masked; a padded target stays masked. With
  `segments` [B, T+1] (packed sequences: the segment of each input and target token), a target
  in another segment than position t is masked too.
  """
  b, t = targets.shape
  m = _mask_or_ones(mask, targets.shape)
  if depth >= t:
    return jnp.zeros_like(targets), jnp.zeros_like(m)
  shifted = jnp.concatenate([targets[:, depth:], jnp.zeros((b, depth), targets.dtype)], axis=1)
  shifted_m = jnp.concatenate([m[:, depth:], jnp.zeros((b, depth), m.dtype)], axis=1)
  if segments is not None:
    same = segments[:, 1 + depth:] == segments[:, :t - depth]             # [B, T-k]
    shifted_m = shifted_m * jnp.pad(same, ((0, 0), (0, depth))).astype(shifted_m.dtype)
  return shifted, shifted_m


def mtp_loss(mtp_logits: Sequence[jax.Array], targets: jax.Array,
             mask: jax.Array | None = None, segments: jax.Array | None = None
             ) -> tuple[jax.Array, list[jax.Array]]:
  """DeepSeek-V3's MTP loss before its weight λ: the mean over depths D of each depth's CE.

  L_MTP = 1/D Σ_{k=1..D} L_k,  L_k = CE(mtp_logits[k-1][:, t], targets[:, t+k]) over t < T-k.
  (The trainer adds λ · L_MTP to the main loss.) Returns (L_MTP, [L_1, ..., L_D]); zero if D = 0.
  """
  per_depth = []
  for k, logits in enumerate(mtp_logits, start=1):
    tk, mk = mtp_targets(targets, mask, k, segments)
    per_depth.append(cross_entropy(logits, tk, mk)[0])
  if not per_depth:
    return jnp.zeros((), jnp.float32), []
  return sum(per_depth) / len(per_depth), per_depth


def expert_counts(topk_idx: jax.Array, num_experts: int, mask: jax.Array | None = None) -> jax.Array:
  """How many (unmasked) tokens chose each expert: [E] float32 from topk_idx [B, T, K]."""
  m = _mask_or_ones(mask, topk_idx.shape[:2])                            # [B, T]
  w = jnp.broadcast_to(m[..., None], topk_idx.shape).reshape(-1)         # [B*T*K]
  return jnp.zeros((num_experts,), jnp.float32).at[topk_idx.reshape(-1)].add(w)


def balance_loss(scores: jax.Array, topk_idx: jax.Array, *, mask: jax.Array | None = None,
                 per_sequence: bool = True, normalize_scores: bool = True) -> jax.Array:
  """Σ_i f_i P_i, the balance loss before its weight α (DeepSeek-V2 and -V3).

  Over a group of T tokens (one sequence when `per_sequence`, else the whole batch):
    f_i = E / (K·T) · Σ_t 1[i ∈ TopK(t)]      (fraction of routing slots, times E: 1 when balanced)
    P_i = 1/T · Σ_t s'_{i,t}                  (mean routing probability)
    L   = Σ_i f_i P_i,  averaged over the groups.
  DeepSeek-V3's complementary sequence-wise loss: per_sequence=True, normalize_scores=True, where
  s'_{i,t} = s_{i,t} / Σ_j s_{j,t} turns the raw sigmoid affinities into a distribution.
  DeepSeek-V2's expert-level loss: the softmax scores already sum to one (normalizing is a no-op);
  per_sequence follows the config's `seq_aux`.

  scores [B, T, E] raw router scores (float32, without the correction bias); topk_idx [B, T, K].
  Gradients flow through P only (f counts discrete choices).
  """
  scores = scores.astype(jnp.float32)
  b, t, e = scores.shape
  k = topk_idx.shape[-1]
  m = _mask_or_ones(mask, (b, t))[..., None]                             # [B, T, 1]
  if normalize_scores:
    scores = scores / jnp.maximum(jnp.sum(scores, axis=-1, keepdims=True), 1e-20)
  chosen = jnp.sum(jax.nn.one_hot(topk_idx, e, dtype=jnp.float32), axis=2)  # [B, T, E]
  if not per_sequence:  # one group of B*T tokens
    scores, chosen, m = (x.reshape(1, b * t, -1) for x in (scores, chosen, m))
  n_tok = jnp.maximum(jnp.sum(m, axis=1), 1.0)                           # [G, 1]
  f = e / k * jnp.sum(chosen * m, axis=1) / n_tok                        # [G, E]
  p = jnp.sum(scores * m, axis=1) / n_tok                                # [G, E]
  return jnp.mean(jnp.sum(jax.lax.stop_gradient(f) * p, axis=-1))


def bias_update(bias: jax.Array, counts: jax.Array, speed: float) -> jax.Array:
  """DeepSeek-V3's auxiliary-loss-free balancing step for one MoE layer (outside the gradient).

  b_i <- b_i + γ · sign(mean_j c_j - c_i): raised for under-loaded experts, lowered for
  over-loaded ones, unchanged when exactly at the mean. counts c [E] from `expert_counts`.
  """
  counts = counts.astype(jnp.float32)
  step = speed * jnp.sign(jnp.mean(counts) - counts)
  return (bias.astype(jnp.float32) + step).astype(bias.dtype)


def load_stats(counts: jax.Array) -> dict[str, jax.Array]:
  """Expert load of one layer as fractions of the mean: min, max and coefficient of variation."""
  counts = counts.astype(jnp.float32)
  mean = jnp.maximum(jnp.mean(counts), 1e-20)
  return {"min": jnp.min(counts) / mean, "max": jnp.max(counts) / mean,
          "cv": jnp.std(counts) / mean}
